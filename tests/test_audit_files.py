"""
The audit trail's files as the forwarder's queue (appliance.audit.syslog
readBatch): read in order, each record once, whatever the batches' size.
"""

from appliance.audit.syslog import readBatch


def drain(folder, limit):
    cursor, sent = ("", 0), []
    while True:
        lines, cursor, backlog = readBatch(folder, cursor, limit)
        if not lines:
            return sent, cursor, backlog
        sent.extend(lines)


def test_everyRecordOnceInOrderAcrossDays(tmp_path):
    days = {"audit-2026-12-03.log": [b"a%03d" % n for n in range(50)], "audit-2026-12-04.log": [b"b%03d" % n for n in range(50)]}
    for name, lines in days.items():
        (tmp_path / name).write_bytes(b"".join(line + b"\n" for line in lines))
    for limit in (7, 64, 1000, 10**6):
        sent, cursor, backlog = drain(tmp_path, limit)
        assert sent == days["audit-2026-12-03.log"] + days["audit-2026-12-04.log"], limit
        assert (cursor, backlog) == (("audit-2026-12-04.log", 250), 0)


def test_aRecordLongerThanABatchIsSentWhole(tmp_path):
    long = b"x" * 5000
    (tmp_path / "audit-2026-12-04.log").write_bytes(b"short\n" + long + b"\nafter\n")
    sent, _, _ = drain(tmp_path, 100)
    assert sent == [b"short", long, b"after"]


def test_aRecordBeingWrittenWaits(tmp_path):
    path = tmp_path / "audit-2026-12-04.log"
    path.write_bytes(b"one\ntw")
    lines, cursor, backlog = readBatch(tmp_path, ("", 0))
    assert (lines, cursor, backlog) == ([b"one"], ("audit-2026-12-04.log", 4), 2)
    with path.open("ab") as stream:
        stream.write(b"o\n")
    assert readBatch(tmp_path, cursor)[0] == [b"two"]
