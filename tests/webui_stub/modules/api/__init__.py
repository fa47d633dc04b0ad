"""Stand-in for webui's ``modules/api`` (OpenAI-compatible API), request handling only."""
