# One image for every WhisperHub process: web (Daphne), worker (qcluster) and GPU agent.
# On GPU hosts run it with the NVIDIA container runtime (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    WHISPERHUB_VAR_DIR=/data \
    WHISPERHUB_MODEL_DIR=/data/models \
    MEDIA_ROOT=/data/media

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --system --create-home --uid 1000 whisperhub && mkdir -p /data && chown whisperhub /data
USER whisperhub
VOLUME ["/data"]
EXPOSE 8000
CMD ["python", "-m", "daphne", "-b", "0.0.0.0", "-p", "8000", "whisperhub.asgi:application"]
