"""`manage.py gpu_agent`: this node's device agent (registration, telemetry, periodic sweep)."""

import signal

from django.core.management.base import BaseCommand

from gpus.agent import Agent


class Command(BaseCommand):
    help = "Register this node's devices, then report telemetry and run the dispatch sweep until SIGTERM."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Register, report once, sweep once, and exit.")

    def handle(self, *args, once=False, **options):
        agent = Agent()
        if once:
            agent.run_once()
            agent.backend.close()
            node = agent.node
            self.stdout.write(f"node {node.name}: {len(agent.device_ids)} device(s) via {agent.backend.name}")
            return
        signal.signal(signal.SIGTERM, agent.stop)
        signal.signal(signal.SIGINT, agent.stop)
        agent.run()
