"""`dymu-video serve`: an OpenAI-compatible chat endpoint with video and image input, on Ray Serve.

protocol.py  the request and response shapes (OpenAI's chat format plus our ``dymu`` field), errors, SSE
media.py     fetching ``image_url`` / ``video_url`` content (http(s), data:, file://) under limits
deployments.py  the vision encoder and the LLM engine as Ray Serve deployments (wrapping workers/)
backend.py   the ingress's calls on them and on the token-cache actor: media -> tokens -> answer
app.py       the FastAPI ingress deployment, metrics, and the application builder (all three bound)
"""
