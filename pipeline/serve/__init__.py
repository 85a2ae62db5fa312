"""`dymu-video serve`: an OpenAI-compatible chat endpoint with video and image input, on Ray Serve.

protocol.py  the request and response shapes (OpenAI's chat format plus our ``dymu`` field), errors, SSE
media.py     fetching ``image_url`` / ``video_url`` content (http(s), data:, file://) under limits
backend.py   the encoder, LLM and token-cache actors behind the server: media -> tokens -> answer
app.py       the FastAPI ingress as a Ray Serve deployment, metrics, and the application builder
"""
