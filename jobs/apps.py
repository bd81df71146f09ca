from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Transcription jobs"

    def ready(self):
        from django_q.signals import post_spawn

        from jobs import model_cache

        # Preload runs in each q2 worker as it starts: in the forked child, never the parent,
        # which must not touch CUDA before forking.
        post_spawn.connect(model_cache.on_worker_spawn, dispatch_uid="jobs.preload_models")
