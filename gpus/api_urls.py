from django.urls import path

from gpus import apis

urlpatterns = [
    path("memory_status", apis.MemoryStatusApi.as_view(), name="api-memory-status"),
    path("gpus/", apis.GpuListApi.as_view(), name="api-gpus"),
]
