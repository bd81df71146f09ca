"""OpenAI-compatible endpoints: /v1/audio/transcriptions, /v1/audio/translations, /v1/models.

A request becomes an ordinary job (source "openai": visible in the portal, placed by the
ledger like any other) and the response waits for it to finish.

The audio views are async so that a request waiting minutes for its transcription holds no
thread: under ASGI, Django runs a sync view on a thread of its own for the request's whole
life, so many clients waiting at once would pin as many threads. Here only short steps
(authenticate, create the job, one state read per poll, render) run on a thread; the waiting
is an asyncio sleep.
"""

import asyncio
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from django.http import HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from rest_framework import exceptions, serializers
from rest_framework.throttling import UserRateThrottle
from whisper.tokenizer import LANGUAGES

from accounts.authentication import TokenAuthentication
from jobs import services
from jobs.apis import files_too_big
from jobs.models import Job, SchedulerSettings, WhisperModel
from jobs.outputs import result_render

OPENAI_ALIAS = "whisper-1"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
POLL_S = 0.2
SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JsonResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        response = JsonResponse(body, status=self.status)
        if self.status == 401:
            response["WWW-Authenticate"] = "Bearer"
        return response


def _form_errors(errors: dict) -> OpenAIError:
    field, messages = next(iter(errors.items()))
    message = messages[0] if isinstance(messages, list) else str(messages)
    return OpenAIError(400, f"{field}: {message}", param=field, code="invalid_value")


class AudioInputSerializer(serializers.Serializer):
    """The multipart fields OpenAI's audio endpoints take (the ones Whisper can honour)."""

    file = serializers.FileField(allow_empty_file=False)
    model = serializers.CharField()
    language = serializers.ChoiceField(choices=sorted(LANGUAGES), required=False)
    prompt = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    response_format = serializers.ChoiceField(choices=RESPONSE_FORMATS, default="json")
    temperature = serializers.FloatField(default=0.0, min_value=0.0, max_value=1.0)
    timestamp_granularities = serializers.ListField(
        child=serializers.ChoiceField(choices=("word", "segment")), required=False
    )


def _authenticate(request):
    """Bearer (or Token) key, as OpenAI's clients send it; sessions are not accepted here."""
    try:
        found = TokenAuthentication().authenticate(request)
    except exceptions.AuthenticationFailed as exc:
        raise OpenAIError(401, str(exc.detail), code="invalid_api_key") from None
    if found is None:
        raise OpenAIError(401, "Missing API key: send `Authorization: Bearer <token>` (see your profile page).", code="invalid_api_key")
    return found[0]


class _SubmitThrottle(UserRateThrottle):
    # Same scope, hence the same cache key, as the REST API's ScopedRateThrottle("submit"):
    # one budget per user across both APIs.
    scope = "submit"


def _throttle(request, user) -> None:
    request.user = user  # the throttle keys on the authenticated user
    throttle = _SubmitThrottle()
    if not throttle.allow_request(request, None):
        raise OpenAIError(429, f"Rate limit reached; retry in {throttle.wait():.0f} s.", type_="rate_limit_error", code="rate_limit_exceeded")


def _model_resolve(name: str) -> str:
    return settings.WHISPERHUB_DEFAULT_MODEL if name == OPENAI_ALIAS else name


def _job_submit(request, task: str) -> tuple[int, dict]:
    """Authenticate, validate and create the job; returns its id and the options the answer needs."""
    user = _authenticate(request)
    try:
        form, files = request.POST, request.FILES
    except (TooManyFilesSent, RequestDataTooBig):
        raise OpenAIError(413, "Send one file per request.", param="file") from None
    except MultiPartParserError as exc:
        raise OpenAIError(400, f"Malformed multipart body: {exc}", param="file") from None
    payload = {key: form[key] for key in form if not key.startswith("timestamp_granularities")}
    # OpenAI's clients send the list as repeated `timestamp_granularities[]`.
    granularities = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
    if granularities:
        payload["timestamp_granularities"] = granularities
    if "file" in files:
        payload["file"] = files["file"]
    serializer = AudioInputSerializer(data=payload)
    if task == Job.Task.TRANSLATE:
        serializer.fields.pop("language")
    if not serializer.is_valid():
        raise _form_errors(serializer.errors)
    values = serializer.validated_data
    if too_big := files_too_big([values["file"]]):
        raise OpenAIError(413, too_big[0], param="file", code="file_too_large")
    _throttle(request, user)
    granularities = values.get("timestamp_granularities") or ["segment"]
    try:
        job = services.job_create(
            user=user,
            files=[values["file"]],
            model_name=_model_resolve(values["model"]),
            language=values.get("language", ""),
            task=task,
            temperature=values["temperature"],
            initial_prompt=values.get("prompt", ""),
            word_timestamps="word" in granularities,
            source=Job.Source.OPENAI,
        )
    except services.JobInputError as exc:
        param = {"files": "file", "task": "model", "initial_prompt": "prompt"}.get(exc.field, exc.field)
        raise OpenAIError(400, exc.message, param=param, code="invalid_value") from None
    return job.pk, {"format": values["response_format"], "granularities": granularities, "task": task}


def _job_final_state(job_id: int) -> str | None:
    state = Job.objects.filter(pk=job_id).values_list("state", flat=True).first()
    return state if state is None or state in Job.FINAL_STATES else None


def _wait_budget_s() -> float:
    # A job may queue before it runs; allow one full task timeout on top of the queue's own wait,
    # so the bound is finite without cutting a legitimately long transcription short.
    return 2 * SchedulerSettings.load().task_timeout_s


def _job_answer(job_id: int, state: str | None, options: dict) -> HttpResponse:
    if state is None:
        raise OpenAIError(404, f"Job {job_id} was deleted before it finished.", code="job_deleted")
    job = Job.objects.get(pk=job_id)
    if state != Job.State.COMPLETED:
        reason = job.error or f"The job was {state}."
        raise OpenAIError(422, f"Transcription job {job_id} {state}: {reason}", code=f"job_{state}")
    audio = job.files.get()
    result = audio.result
    fmt = options["format"]
    if fmt in ("srt", "vtt"):
        return HttpResponse(result_render(result=result, fmt=fmt), content_type="text/plain; charset=utf-8")
    text = result["text"].strip()
    if fmt == "text":
        return HttpResponse(text + "\n", content_type="text/plain; charset=utf-8")
    if fmt == "json":
        return JsonResponse({"text": text})
    return JsonResponse(_verbose(result, audio, options))


def _verbose(result: dict, audio, options: dict) -> dict:
    language = result.get("language") or audio.language
    body = {
        "task": options["task"],
        "language": LANGUAGES.get(language, language),
        "duration": audio.duration_s or (result["segments"][-1]["end"] if result["segments"] else 0.0),
        "text": result["text"].strip(),
    }
    if "segment" in options["granularities"]:
        # The stored result may leave out token ids (they mean nothing outside the model's tokenizer).
        body["segments"] = [
            {**{key: segment[key] for key in SEGMENT_KEYS}, "tokens": segment.get("tokens", [])}
            for segment in result["segments"]
        ]
    if "word" in options["granularities"]:
        body["words"] = [
            {"word": word["word"].strip(), "start": word["start"], "end": word["end"]}
            for segment in result["segments"]
            for word in segment.get("words", [])
        ]
    return body


async def _audio_endpoint(request, task: str) -> HttpResponse:
    try:
        job_id, options = await sync_to_async(_job_submit)(request, task)
        deadline = time.monotonic() + await sync_to_async(_wait_budget_s)()
        state = await sync_to_async(_job_final_state)(job_id)
        while state is None and await sync_to_async(Job.objects.filter(pk=job_id).exists)():
            if time.monotonic() > deadline:
                raise OpenAIError(504, f"Job {job_id} is still running; follow it at /api/jobs/{job_id}/.", type_="timeout", code="timeout")
            await asyncio.sleep(POLL_S)
            state = await sync_to_async(_job_final_state)(job_id)
        return await sync_to_async(_job_answer)(job_id, state, options)
    except OpenAIError as exc:
        return exc.response()


@csrf_exempt
@require_POST
async def transcriptions(request):
    return await _audio_endpoint(request, Job.Task.TRANSCRIBE)


@csrf_exempt
@require_POST
async def translations(request):
    return await _audio_endpoint(request, Job.Task.TRANSLATE)


def _model_object(name: str, created) -> dict:
    return {"id": name, "object": "model", "created": int(created.timestamp()), "owned_by": "whisperhub"}


def _models_available() -> list[dict]:
    models = [m for m in WhisperModel.objects.filter(enabled=True) if m.installed]
    listed = [_model_object(m.name, m.created_at) for m in models]
    default = next((m for m in models if m.name == settings.WHISPERHUB_DEFAULT_MODEL), None)
    if default is not None:
        listed.insert(0, _model_object(OPENAI_ALIAS, default.created_at))
    return listed


@require_GET
def model_list(request):
    try:
        _authenticate(request)
    except OpenAIError as exc:
        return exc.response()
    return JsonResponse({"object": "list", "data": _models_available()})


@require_GET
def model_detail(request, model_id):
    try:
        _authenticate(request)
        found = next((m for m in _models_available() if m["id"] == model_id), None)
        if found is None:
            raise OpenAIError(404, f"The model '{model_id}' does not exist or is not installed.", param="model", code="model_not_found")
    except OpenAIError as exc:
        return exc.response()
    return JsonResponse(found)
