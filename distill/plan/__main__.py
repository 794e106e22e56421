"""``python -m distill.plan``: run the planner's Hydra app (`distill.plan.app.main`)."""

from __future__ import annotations

from distill.hydra_errors import run_app
from distill.plan.app import main

if __name__ == "__main__":
    run_app(main, "plan")
