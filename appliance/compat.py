"""
The private parts of Twisted the appliance cannot do without, in one place,
each with why; tests/test_twisted_hooks.py checks what each does, so that a
Twisted that changes one fails the build, not the appliance.
"""

from twisted.application.internet import StreamServerEndpointService


def bindAtStart(service: StreamServerEndpointService) -> StreamServerEndpointService:
    """
    Make C{service}'s start raise at once when its port cannot be bound:
    the start ends with the error, instead of a log line and a daemon without
    its listener.  twisted.application.strports sets the same attribute;
    Twisted has no public way.
    """
    service._raiseSynchronously = True
    return service
