"""REST API for jobs and models: small APIViews, nested serializers, services for every write."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from django.http import HttpResponse
from django.urls import reverse
from django.utils.http import content_disposition_header
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView
from whisper.tokenizer import LANGUAGES

from jobs import services
from jobs.models import AudioFile, Job, SchedulerSettings, WhisperModel
from jobs.outputs import CONTENT_TYPES, FORMATS, download_filename, result_render
from jobs.selectors import job_get_for_user, jobs_for_user, pending_queue


def job_queue_info() -> dict[int, dict]:
    """Position in the dispatch order (1 = next) and estimated start of every pending job, by job id."""
    return {job.pk: {"position": job.position, "estimated_start": job.estimated_start} for job in pending_queue()}


def job_state(*, job: Job, queue: dict | None = None) -> dict:
    """The JSON a job's page and socket clients consume: what GET /api/jobs/{id}/ returns."""
    if queue is None:
        queue = job_queue_info() if job.state == Job.State.PENDING else {}
    return JobDetailSerializer(job, context={"queue": queue}).data


def files_too_big(files) -> list[str]:
    limit = settings.MAX_UPLOAD_MB * 1024 * 1024
    return [f"{f.name}: larger than {settings.MAX_UPLOAD_MB} MB." for f in files if f.size > limit]


class UploadLimitsMixin:
    """Refusals of the request body itself, answered in the API's JSON shape naming the field.

    Django refuses too many file parts, or too large other fields, by raising (an HTML 400
    otherwise); DRF's answer to a body that is neither multipart nor JSON names no field.
    """

    def handle_exception(self, exc):
        if isinstance(exc, TooManyFilesSent):
            message = f"Too many files: at most {settings.MAX_FILES_PER_JOB} per job."
            return Response({"files": [message]}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        if isinstance(exc, RequestDataTooBig):
            message = f"The fields other than files exceed {settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 1024} KiB."
            return Response({"non_field_errors": [message]}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        if isinstance(exc, exceptions.UnsupportedMediaType):
            message = f"Send the audio as multipart/form-data field 'files', not {self.request.content_type or 'an empty body'}."
            return Response({"files": [message]}, status=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE)
        return super().handle_exception(exc)


class FileSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField(source="original_name")
    state = serializers.CharField()
    progress = serializers.SerializerMethodField()
    duration_s = serializers.FloatField()

    def get_progress(self, audio_file) -> float:
        return round(audio_file.progress * 100, 1)


class FileDetailSerializer(FileSummarySerializer):
    language = serializers.CharField()
    text = serializers.CharField()
    error = serializers.CharField()
    downloads = serializers.SerializerMethodField()

    def get_downloads(self, audio_file) -> dict[str, str]:
        if audio_file.result is None:
            return {}
        url = reverse("api-job-file-download", args=[audio_file.job_id, audio_file.pk])
        return {fmt: f"{url}?format={fmt}" for fmt in audio_file.job.output_formats or FORMATS}


class JobSummarySerializer(serializers.Serializer):
    """A job as lists show it. context["queue"] is job_queue_info() (or {} when none is pending)."""

    id = serializers.IntegerField()
    name = serializers.CharField(source="display_name")
    state = serializers.CharField()
    progress = serializers.SerializerMethodField()
    error = serializers.CharField()
    queue_position = serializers.SerializerMethodField()
    estimated_start = serializers.SerializerMethodField()
    model = serializers.CharField(source="model_name")
    language = serializers.CharField()
    task = serializers.CharField()
    priority = serializers.CharField()
    source = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField()
    files = FileSummarySerializer(many=True)

    def get_progress(self, job) -> float:
        return round(job.progress * 100, 1)

    def get_queue_position(self, job) -> int | None:
        return self.context["queue"].get(job.pk, {}).get("position")

    def get_estimated_start(self, job) -> str | None:
        when = self.context["queue"].get(job.pk, {}).get("estimated_start")
        return when.isoformat() if when else None


class JobDetailSerializer(JobSummarySerializer):
    """A job with its options and its files' text and download links: GET /api/jobs/{id}/."""

    temperature = serializers.FloatField()
    beam_size = serializers.IntegerField()
    initial_prompt = serializers.CharField()
    word_timestamps = serializers.BooleanField()
    output_formats = serializers.ListField(child=serializers.CharField())
    callback_url = serializers.CharField()
    files = FileDetailSerializer(many=True)


class FormatListField(serializers.ListField):
    """Formats as repeated fields or one comma-separated value (`-F output_formats=srt,vtt`)."""

    child = serializers.ChoiceField(choices=FORMATS)

    def to_internal_value(self, data):
        items = [data] if isinstance(data, str) else data
        split = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        return list(dict.fromkeys(super().to_internal_value(split)))


class JobListApi(UploadLimitsMixin, APIView):
    """GET: my jobs, newest first (`?state=`, `?id=` repeated). POST: submit a job (multipart)."""

    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema_serializer(component_name="JobListFilter")
    class FilterSerializer(serializers.Serializer):
        state = serializers.ChoiceField(choices=Job.State.choices, required=False)
        id = serializers.ListField(child=serializers.IntegerField(), required=False)

    @extend_schema_serializer(component_name="JobCreateInput")
    class InputSerializer(serializers.Serializer):
        files = serializers.ListField(
            child=serializers.FileField(allow_empty_file=False),
            min_length=1,
            error_messages={"required": "No file: send the audio as multipart/form-data field 'files' (repeat it for several)."},
        )
        model = serializers.CharField(default=settings.WHISPERHUB_DEFAULT_MODEL)
        language = serializers.ChoiceField(choices=["", "auto"] + sorted(LANGUAGES), default="", allow_blank=True)
        task = serializers.ChoiceField(choices=Job.Task.choices, default=Job.Task.TRANSCRIBE)
        priority = serializers.ChoiceField(choices=Job.Priority.choices, default=Job.Priority.NORMAL)
        temperature = serializers.FloatField(default=0.0, min_value=0.0, max_value=1.0)
        beam_size = serializers.IntegerField(default=5, min_value=1, max_value=10)
        initial_prompt = serializers.CharField(default="", allow_blank=True, max_length=2000)
        word_timestamps = serializers.BooleanField(default=False)
        output_formats = FormatListField(required=False)
        callback_url = serializers.URLField(default="", allow_blank=True, max_length=200)
        name = serializers.CharField(default="", allow_blank=True, max_length=200)

        def validate_callback_url(self, value):
            if value and not value.lower().startswith(("http://", "https://")):
                raise serializers.ValidationError("Only http:// and https:// callback URLs are allowed.")
            return value

    def get_throttles(self):
        # Only submissions are rate limited; reading one's jobs is not.
        if self.request.method == "POST":
            self.throttle_scope = "submit"
            return [ScopedRateThrottle()]
        return super().get_throttles()

    @extend_schema(parameters=[FilterSerializer], responses=JobSummarySerializer(many=True))
    def get(self, request):
        params = {"state": request.query_params.get("state"), "id": request.query_params.getlist("id")}
        filters = self.FilterSerializer(data={key: value for key, value in params.items() if value})
        filters.is_valid(raise_exception=True)
        jobs = jobs_for_user(user=request.user).prefetch_related("files")
        if "state" in filters.validated_data:
            jobs = jobs.filter(state=filters.validated_data["state"])
        if "id" in filters.validated_data:
            jobs = jobs.filter(pk__in=filters.validated_data["id"])
        paginator = PageNumberPagination()
        page = paginator.paginate_queryset(jobs, request, view=self)
        context = {"queue": job_queue_info() if any(j.state == Job.State.PENDING for j in page) else {}}
        return paginator.get_paginated_response(JobSummarySerializer(page, many=True, context=context).data)

    @extend_schema(request={"multipart/form-data": InputSerializer}, responses={201: JobDetailSerializer})
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if too_big := files_too_big(data["files"]):
            return Response({"files": too_big}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        try:
            job = services.job_create(
                user=request.user,
                files=data["files"],
                model_name=data["model"],
                language=data["language"],
                task=data["task"],
                priority=data["priority"],
                temperature=data["temperature"],
                beam_size=data["beam_size"],
                initial_prompt=data["initial_prompt"],
                word_timestamps=data["word_timestamps"],
                output_formats=data.get("output_formats") or list(FORMATS),
                callback_url=data["callback_url"],
                name=data["name"],
                source=Job.Source.API,
            )
        except services.JobInputError as exc:
            return Response({exc.field: [exc.message]}, status=status.HTTP_400_BAD_REQUEST)
        return Response(job_state(job=job), status=status.HTTP_201_CREATED)


class JobDetailApi(APIView):
    """GET: one job with its files, their progress and text. DELETE: cancel it and remove its files."""

    @extend_schema(responses=JobDetailSerializer)
    def get(self, request, job_id):
        job = job_get_for_user(user=request.user, job_id=job_id)
        return Response(job_state(job=job))

    @extend_schema(responses={204: None})
    def delete(self, request, job_id):
        job = job_get_for_user(user=request.user, job_id=job_id)
        services.job_delete(job=job)
        return Response(status=status.HTTP_204_NO_CONTENT)


class JobCancelApi(APIView):
    """Cancel a pending or running job; a finished job answers 409."""

    @extend_schema(request=None, responses=JobDetailSerializer)
    def post(self, request, job_id):
        job = job_get_for_user(user=request.user, job_id=job_id)
        try:
            job = services.job_cancel(job=job)
        except services.JobStateError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(job_state(job=job))


class JobRetryApi(APIView):
    """Queue a failed or cancelled job again; any other state answers 409."""

    @extend_schema(request=None, responses=JobDetailSerializer)
    def post(self, request, job_id):
        job = job_get_for_user(user=request.user, job_id=job_id)
        try:
            job = services.job_retry(job=job)
        except services.JobStateError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        except services.JobInputError as exc:  # its model was since disabled or removed
            return Response({exc.field: [exc.message]}, status=status.HTTP_409_CONFLICT)
        return Response(job_state(job=job))


class IgnoreFormatParamNegotiation(DefaultContentNegotiation):
    """`?format=srt` names the result format here, not a DRF renderer (which would 404 it)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class JobFileDownloadApi(APIView):
    """One file's result as txt, srt, vtt, tsv or json, written by openai-whisper's writers."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = IgnoreFormatParamNegotiation

    @extend_schema(
        parameters=[OpenApiParameter("format", enum=FORMATS, default="txt")],
        responses={(200, "text/plain"): str, 400: None, 404: None, 409: None},
    )
    def get(self, request, job_id, file_id):
        job = job_get_for_user(user=request.user, job_id=job_id)
        fmt = request.query_params.get("format", "txt")
        if fmt not in FORMATS:
            return Response({"format": [f"Unknown format {fmt!r}; one of {', '.join(FORMATS)}."]}, status=400)
        audio_file = AudioFile.objects.filter(job=job, pk=file_id).first()
        if audio_file is None:
            return Response({"detail": "No such file in this job."}, status=404)
        if audio_file.result is None:
            return Response({"detail": f"This file has no result yet (it is {audio_file.state})."}, status=409)
        response = HttpResponse(result_render(result=audio_file.result, fmt=fmt), content_type=CONTENT_TYPES[fmt])
        response["Content-Disposition"] = content_disposition_header(True, download_filename(audio_file.original_name, fmt))
        return response


class ModelListApi(APIView):
    """Models a job can use now (enabled, checkpoint installed) and the memory each reserves."""

    @extend_schema_serializer(component_name="Model")
    class OutputSerializer(serializers.Serializer):
        name = serializers.CharField()
        memory_mb = serializers.IntegerField()
        reservation_mb = serializers.IntegerField()
        english_only = serializers.BooleanField()
        preload = serializers.BooleanField()
        default = serializers.BooleanField()

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request):
        multiplier = SchedulerSettings.load().inference_multiplier
        rows = [
            {
                "name": m.name,
                "memory_mb": m.memory_mb,
                "reservation_mb": round(m.memory_mb * multiplier),
                "english_only": m.english_only,
                "preload": m.preload,
                "default": m.name == settings.WHISPERHUB_DEFAULT_MODEL,
            }
            for m in WhisperModel.objects.filter(enabled=True)
            if m.installed
        ]
        return Response(self.OutputSerializer(rows, many=True).data)
