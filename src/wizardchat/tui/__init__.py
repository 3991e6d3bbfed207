"""The terminal chat: the REPL, its slash commands, line editing, rendering, progress."""
