"""The on-premise data connector: dials out, registers, serves its datasets through the tunnel.

    config.py    ConnectorConfig, and how registrations end (refused, refused for now, replaced)
    pool.py      Connector: its tunnels ("slots"), the gateway each dials, backoff, goaway
    dial.py      where a link may go, and the link to one, by transport
    session.py   one registered link: requests in, a task per stream, credit, frame size, compression
    serving.py   what it serves: its sources, SQL over them, and the answer to each request
"""

from .config import ConnectorConfig, RegistrationRefused, Replaced
from .dial import names_several
from .pool import Connector, backoff_delay
from .session import frame_budget

__all__ = ["Connector", "ConnectorConfig", "RegistrationRefused", "Replaced", "backoff_delay", "frame_budget",
           "names_several"]
