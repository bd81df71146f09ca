from django.urls import path

from jobs import apis

urlpatterns = [
    path("jobs/", apis.JobListApi.as_view(), name="api-jobs"),
    path("jobs/<int:job_id>/", apis.JobDetailApi.as_view(), name="api-job"),
    path("jobs/<int:job_id>/cancel/", apis.JobCancelApi.as_view(), name="api-job-cancel"),
    path("jobs/<int:job_id>/retry/", apis.JobRetryApi.as_view(), name="api-job-retry"),
    path(
        "jobs/<int:job_id>/files/<int:file_id>/download",
        apis.JobFileDownloadApi.as_view(),
        name="api-job-file-download",
    ),
    path("models/", apis.ModelListApi.as_view(), name="api-models"),
]
