"""Websocket routes of every app, in one list for asgi.py and the tests."""

websocket_urlpatterns: list = []
