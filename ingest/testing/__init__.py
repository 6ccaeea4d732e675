"""Test support: a bundled Discord Gateway v10 simulator, since tests never reach Discord.

``GatewaySimulator`` runs on the caller's event loop; ``SimulatorThread`` runs one on its own.
"""

from ingest.testing.simulator import GatewaySimulator, SimulatorThread

__all__ = ["GatewaySimulator", "SimulatorThread"]
