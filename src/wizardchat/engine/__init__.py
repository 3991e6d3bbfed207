"""The only package that imports llama_cpp: loading, expert placement and token generation."""
