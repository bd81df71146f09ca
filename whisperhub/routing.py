"""Websocket routes of every app, in one list for asgi.py and the tests."""

from django.urls import path

from gpus.consumers import DashboardConsumer
from jobs.consumers import JobsConsumer

websocket_urlpatterns: list = [
    path("ws/jobs/", JobsConsumer.as_asgi()),
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
]
