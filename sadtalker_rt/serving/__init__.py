"""``sadtalker-rt serve``: one model behind an HTTP and websocket API and a web page (Starlette on uvicorn).

The runtime never imports this package; it needs the ``serve`` extra.
"""
