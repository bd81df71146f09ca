"""OpenAI-compatible routes, mounted at /v1/ so that `base_url=<site>/v1` works for OpenAI's clients."""

from django.urls import path

from jobs import openai_api

urlpatterns = [
    path("audio/transcriptions", openai_api.transcriptions, name="openai-transcriptions"),
    path("audio/translations", openai_api.translations, name="openai-translations"),
    path("models", openai_api.model_list, name="openai-models"),
    path("models/<str:model_id>", openai_api.model_detail, name="openai-model"),
]
