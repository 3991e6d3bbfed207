"""`python -m wizardchat`."""

from wizardchat.entry import main

main()
