"""Direct messages: store in the recipient's inbox, deliver to every connection of the
recipient, retry until acknowledged, replay on connect (:mod:`.postman`); in a cluster,
re-check inboxes against the shared store (:mod:`.rechecks`). What the postman talks to
and sends is in :mod:`.interfaces`.

One concept, one name: the node's :class:`Postman` delivers; in a cluster it hands
what it stored to a :class:`Relay` (:class:`fastim.cluster.dm.DmRouter`), which carries it
to the other nodes, whose postmen deliver it (:meth:`Postman.deliver_remote`). The
client's receiving side is :mod:`fastim.client.direct`.
"""

from .interfaces import Relay, Session, dm_event, event_epoch, event_mid
from .postman import Postman

__all__ = ["Postman", "Relay", "Session", "dm_event", "event_epoch", "event_mid"]
