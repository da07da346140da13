"""Direct messages: store in the recipient's inbox, deliver to every connection of the
recipient, retry until acknowledged, replay on connect (:mod:`.postman`).

One concept, one name: the node's :class:`Postman` delivers; in a cluster it hands
what it stored to a :class:`Relay` (:class:`fastim.cluster.dm.DmRouter`), which carries it
to the other nodes, whose postmen deliver it (:meth:`Postman.deliver_remote`). The
client's receiving side is :mod:`fastim.client.direct`.
"""

from .postman import Postman, Relay, Session, dm_event, event_epoch, event_mid

__all__ = ["Postman", "Relay", "Session", "dm_event", "event_epoch", "event_mid"]
