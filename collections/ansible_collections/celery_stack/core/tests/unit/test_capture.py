"""Unit tests of the capture tool's pcap reader, TCP reassembly and needle search
(molecule/shared/capture.py, which the cluster scenario's tests/test_tls.py runs on a capture of
the whole converge). The pcaps are written here, packet by packet. Run by `make test` (test.sh unit).
"""

import base64
import importlib.machinery
import importlib.util
import json
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[6] / "molecule" / "shared" / "capture.py"
loader = importlib.machinery.SourceFileLoader("celery_stack_capture", str(SCRIPT))
capture = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
loader.exec_module(capture)

CLIENT, BROKER, REDIS = "172.30.90.31", "172.30.90.11", "172.30.90.21"
SYN, ACK, PSH = 0x02, 0x10, 0x08


def ipv4(address):
    return bytes(int(part) for part in address.split("."))


def tcp_packet(src, sport, dst, dport, seq, flags=ACK | PSH, payload=b""):
    """An IPv4 packet with a TCP segment (checksums left 0: the reader does not check them)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, 0, 5 << 4, flags, 65535, 0, 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, ipv4(src), ipv4(dst))
    return header + tcp


def ethernet(packet):
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + packet


def linux_cooked(packet):
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800) + packet


def write_pcap(path, frames, linktype=1, order="<"):
    header = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    records = b"".join(struct.pack(order + "IIII", 1700000000, n, len(f), len(f)) + f for n, f in enumerate(frames))
    path.write_bytes(header + records)
    return path


def connection(client_port, server, server_port, client_data, server_data=(), isn=1000, server_isn=5000,
               frame=ethernet):
    """The frames of one connection: handshake, then the client's and the server's segments, each
    given as (offset in its direction, bytes) in the order they are sent."""
    frames = [frame(tcp_packet(CLIENT, client_port, server, server_port, isn, SYN)),
              frame(tcp_packet(server, server_port, CLIENT, client_port, server_isn, SYN | ACK))]
    frames += [frame(tcp_packet(CLIENT, client_port, server, server_port, isn + 1 + offset, payload=data))
               for offset, data in client_data]
    frames += [frame(tcp_packet(server, server_port, CLIENT, client_port, server_isn + 1 + offset, payload=data))
               for offset, data in server_data]
    return frames


def scan(tmp_path, frames, needles, **pcap):
    return capture.scan(write_pcap(tmp_path / "c.pcap", frames, **pcap), needles)


def found(result):
    return [(hit["needle"], hit["form"], hit["stream"], hit["count"]) for hit in result["hits"]]


def test_a_needle_split_over_segments_out_of_order_and_retransmitted_is_found_once(tmp_path):
    message = b"\x01\x00\x00PLAIN\x00celery\x00local-broker-secret\x00tail"
    frames = connection(40000, BROKER, 5672, [(20, message[20:]), (0, message[:25]), (10, message[10:30])])
    result = scan(tmp_path, frames, [b"local-broker-secret", b"not-there"])
    assert found(result) == [(1, "raw", f"{CLIENT}:40000->{BROKER}:5672", 1)]
    assert result["packets"] == 5


def test_what_the_capture_missed_is_not_bridged(tmp_path):
    """A lost segment leaves a gap: a needle is never matched across it."""
    frames = connection(40001, BROKER, 5672, [(0, b"local-bro"), (20, b"r-secret")])
    result = scan(tmp_path, frames, [b"local-broker-secret"])
    assert found(result) == []
    assert [s["gaps"] for s in result["streams"]] == [1, 0]


def test_basic_auth_and_percent_encoding_are_decoded(tmp_path):
    basic = base64.b64encode(b"ops:p@ss:w/rd#%").decode()
    request = (f"GET /api/workers HTTP/1.1\r\nHost: worker2:5555\r\nauthorization: Basic {basic}\r\n\r\n"
               "GET /x?url=amqp://celery:p%40ss%3aw%2Frd%23%25@mq1 HTTP/1.1\r\n\r\n").encode()
    result = scan(tmp_path, connection(40002, BROKER, 5555, [(0, request)]), [b"p@ss:w/rd#%", b"celery"])
    stream = f"{CLIENT}:40002->{BROKER}:5555"
    assert found(result) == [(1, "basic-auth", stream, 1), (1, "percent", stream, 1), (2, "raw", stream, 1)]


def test_connections_tell_tls_from_plain_by_their_first_bytes(tmp_path):
    hello = b"\x16\x03\x01\x00\x05hello"
    frames = (connection(40003, BROKER, 5671, [(0, hello)], [(0, b"\x16\x03\x03\x00\x02hi")])
              + connection(40004, REDIS, 6379, [(0, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")])
              # a connection without data (refused: SYN, RST) and one whose start was not captured
              + connection(40005, BROKER, 5672, [])
              + [ethernet(tcp_packet(BROKER, 25672, CLIENT, 40006, 77, payload=b"\x17\x03\x03mid-stream"))])
    result = scan(tmp_path, frames, [b"absent"])
    by_port = {c["server_port"]: c for c in result["connections"]}
    assert sorted(by_port) == [5671, 5672, 6379, 25672]
    assert (by_port[5671]["tls"], by_port[5671]["client"], by_port[5671]["bytes_to_client"]) == (
        True, f"{CLIENT}:40003", 7)
    assert by_port[6379]["tls"] is False and by_port[6379]["bytes_to_server"] == 22
    assert by_port[5672]["bytes_to_server"] == 0
    assert by_port[25672]["start_seen"] is False and by_port[25672]["tls"] is None
    summary = capture.port_summary(result["connections"])
    assert {port: (row["with_data"], row["tls"], row["plain"], row["unknown"]) for port, row in summary.items()} == {
        5671: (1, 1, 0, 0), 5672: (0, 0, 0, 0), 6379: (1, 0, 1, 0), 25672: (1, 0, 0, 1)}


def test_a_reused_port_is_a_new_connection(tmp_path):
    frames = (connection(40007, REDIS, 6379, [(0, b"first")], isn=1)
              + connection(40007, REDIS, 6379, [(0, b"second local-results-secret")], isn=900000))
    result = scan(tmp_path, frames, [b"local-results-secret"])
    assert found(result) == [(1, "raw", f"{CLIENT}:40007->{REDIS}:6379 #2", 1)]
    assert len(result["connections"]) == 2


def test_a_port_used_again_after_a_refused_attempt_pairs_the_right_directions(tmp_path):
    """A SYN answered by RST, then a new SYN on the same ports: the second connection's
    SYN-ACK and data belong to it, not to the refused attempt (seen in a capture of the cluster)."""
    refused = [ethernet(tcp_packet(CLIENT, 40011, BROKER, 5671, 10, SYN)),
               ethernet(tcp_packet(BROKER, 5671, CLIENT, 40011, 0, 0x04 | ACK))]
    frames = refused + connection(40011, BROKER, 5671, [(0, b"\x16\x03\x01hello")], [(0, b"\x16\x03\x03hi")],
                                  isn=777777)
    result = scan(tmp_path, frames, [b"absent"])
    assert [(c["client"], c["bytes_to_server"], c["bytes_to_client"], c["tls"]) for c in result["connections"]] == [
        (f"{CLIENT}:40011", 0, 0, None), (f"{CLIENT}:40011", 8, 5, True)]
    assert [s["stream"] for s in result["streams"] if s["bytes"]] == [
        f"{CLIENT}:40011->{BROKER}:5671 #2", f"{BROKER}:5671->{CLIENT}:40011 #2"]


def test_sequence_numbers_wrap(tmp_path):
    frames = connection(40008, REDIS, 6379, [(0, b"AUTH celery-res"), (15, b"ults local-results-secret")],
                        isn=2**32 - 10)
    assert found(scan(tmp_path, frames, [b"local-results-secret"])) == [
        (1, "raw", f"{CLIENT}:40008->{REDIS}:6379", 1)]


def test_big_endian_files_and_linux_cooked_frames(tmp_path):
    frames = connection(40009, BROKER, 5672, [(0, b"xx local-broker-secret")], frame=linux_cooked)
    result = scan(tmp_path, frames, [b"local-broker-secret"], linktype=113, order=">")
    assert [hit["stream"] for hit in result["hits"]] == [f"{CLIENT}:40009->{BROKER}:5672"]


def test_a_file_that_is_not_a_pcap_is_refused(tmp_path):
    path = tmp_path / "x.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)
    with pytest.raises(ValueError, match="not a libpcap file"):
        capture.scan(path, [b"x"])


def test_needles_are_lines_of_the_file(tmp_path):
    path = tmp_path / "needles"
    path.write_bytes(b"first\r\n\nsecond one\nlast")
    assert capture.read_needles(path) == [b"first", b"second one", b"last"]


def test_the_scan_command_never_prints_a_needle_and_exits_1_when_one_is_found(tmp_path, capsys):
    secret = b"local-broker-secret"
    pcap = write_pcap(tmp_path / "c.pcap", connection(40010, BROKER, 5672, [(0, b"PLAIN\0celery\0" + secret)]))
    needles = tmp_path / "needles"
    needles.write_bytes(secret + b"\n")
    report = tmp_path / "report.json"
    assert capture.main(["scan", "--pcap", str(pcap), "--needle-file", str(needles), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "| #1     | 19     | raw" in out and "needles found: 1 of 1 #1" in out
    assert secret.decode() not in out and secret.decode() not in report.read_text()
    assert json.loads(report.read_text())["hits"][0]["stream"] == f"{CLIENT}:40010->{BROKER}:5672"
    needles.write_bytes(b"something else\n")
    assert capture.main(["scan", "--pcap", str(pcap), "--needle-file", str(needles)]) == 0


def test_the_capture_filter_keeps_the_network_and_leaves_out_the_mirror():
    info = {"IPAM": {"Config": [{"Subnet": "172.30.90.0/24"}, {"Subnet": "fd00::/64"}]},
            "Containers": {"x": {"Name": "celery-stack-cluster-mirror", "IPv4Address": "172.30.90.5/24"}}}
    assert capture.capture_filter(info, ["celery-stack-cluster-mirror"], False) == (
        "(src net 172.30.90.0/24) and (dst net 172.30.90.0/24) and not host 172.30.90.5")
    assert capture.capture_filter(info, [], True) == ""
    with pytest.raises(SystemExit, match="not a container of the network"):
        capture.capture_filter(info, ["no-such-host"], False)


def test_tcpdump_runs_as_root_or_through_sudo(monkeypatch):
    monkeypatch.setattr(capture.os, "geteuid", lambda: 0)
    assert capture.as_root(["tcpdump", "-i", "br-x"]) == ["tcpdump", "-i", "br-x"]
    monkeypatch.setattr(capture.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(capture.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    assert capture.as_root(["tcpdump"]) == ["sudo", "-n", "tcpdump"]
    monkeypatch.setattr(capture.shutil, "which", lambda name, path=None: None)
    with pytest.raises(SystemExit, match="needs root"):
        capture.as_root(["tcpdump"])
