"""The OpenAI-compatible steering server, its FLAS routes and playground, and the chat REPL."""
