from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="jobs:list", permanent=False), name="home"),
    path("admin/", admin.site.urls),
    path("accounts/", include("accounts.urls")),
    # login, logout (POST), password_change and password reset, under Django's own names
    path("accounts/", include("django.contrib.auth.urls")),
    path("jobs/", include("jobs.urls")),
    path("", include("gpus.urls")),
    path("api/", include("whisperhub.api_urls")),
    path("v1/", include("jobs.openai_urls")),
]
