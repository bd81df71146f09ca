"""Every /api/ route, collected from the apps."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("schema/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="schema-docs"),
    path("", include("accounts.api_urls")),
    path("", include("gpus.api_urls")),
    path("", include("jobs.api_urls")),
]
