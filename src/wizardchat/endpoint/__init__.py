"""Chatting through an OpenAI-compatible server (`--endpoint`): vLLM, llama-server,
llama-cpp-python's server, `wizardchat serve --http`."""
