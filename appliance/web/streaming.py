"""
Streaming producers on twisted.web requests, paused from the start when the
client is not reading.
"""

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request


def registerStreamingProducer(request: Request, producer: IPushProducer) -> None:
    """
    Register C{producer} as C{request}'s streaming producer, and pause it at
    once if the client's connection holds the request's channel paused.
    """
    request.registerProducer(producer, True)
    # HTTPChannel.registerProducer (Twisted 26.10) does not pause a producer
    # registered while the transport holds the channel paused.  The TLS
    # transport passes a pause on only once (tls._ProducerMembrane), so the
    # producer would write its whole body into memory.  twisted.web does not
    # say that the channel is paused: the appliance's channel does.
    if request.channel.writesPaused:
        producer.pauseProducing()
