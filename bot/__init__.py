"""The raycord front-end: config, runtime, pipeline, LLM backends and the chat front-ends."""
