"""The conversation: Vicuna turns as tokens, the session, batch mode, saved sessions."""
