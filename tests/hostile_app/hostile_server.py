"""The project's own ServerApp, unchanged: only the run config comes from this test app."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app.app import main as project_main

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the project's ServerApp."""
    project_main(grid, context)
