from django.urls import path

from gpus import views

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
]
