from django.urls import path

from gpus import views
from gpus.metrics import metrics_view

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/snapshot/", views.dashboard_snapshot_view, name="dashboard-snapshot"),
    path("metrics", metrics_view, name="metrics"),
]
