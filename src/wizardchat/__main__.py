"""`python -m wizardchat`."""

from wizardchat.cli import main

main()
