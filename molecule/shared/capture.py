"""Capture what crosses a docker network and look for secrets in it (issue 22: TLS on every
connection). Controller side, standard library only; run it with the repository venv's python.

  capture.py start --network NAME --pcap FILE [--exclude-host NAME_OR_IP ...] [--all-traffic]
      tcpdump on the network's Linux bridge, in the background, writing FILE (pid in FILE.pid,
      tcpdump's messages in FILE.log). Returns once tcpdump listens. Only traffic between two
      addresses of the network's subnets by default (not the package downloads of the hosts
      through the gateway); --exclude-host leaves out a container of the network (the test apt
      mirror: megabytes of packages, no stack connection).
  capture.py stop --pcap FILE
      stops that tcpdump and prints its packet counts (packets dropped by the kernel were not
      searched).
  capture.py scan --pcap FILE --needle-file F [--json OUT]
      reassembles every TCP direction of the capture and searches it for each needle (one per
      line of F): raw, inside HTTP `Authorization: Basic` values (base64 of user:password) and
      percent-decoded. Prints the hits (needle, form, stream src:port->dst:port, count), then per
      server port the connections, TLS or plain by their client's first bytes (a TLS record:
      0x16 0x03). Needles are shown by index and length only, never their value; they come in a
      file (not argv) so that no secret reaches a process listing or a log. Exit status 1 when
      any needle was found, 0 otherwise.

The pcap parser reads libpcap files (either byte order, micro- or nanosecond timestamps) with
Ethernet (802.1Q tags too) or Linux cooked (SLL) frames, IPv4 and TCP.
"""

import argparse
import base64
import json
import mmap
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict

# --- the pcap format -----------------------------------------------------------------------

PCAP_MAGICS = {  # magic as read little-endian -> (byte order, timestamp in nanoseconds)
    0xA1B2C3D4: ("<", False),
    0xD4C3B2A1: (">", False),
    0xA1B23C4D: ("<", True),
    0x4D3CB2A1: (">", True),
}
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = (0x8100, 0x88A8)
IPPROTO_TCP = 6
TCP_SYN, TCP_ACK = 0x02, 0x10


def read_packets(data):
    """(linktype, frame bytes) of every packet of a libpcap file's contents."""
    if len(data) < 24:
        raise ValueError("not a pcap file: shorter than its header")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic not in PCAP_MAGICS:
        raise ValueError(f"not a libpcap file (magic {magic:#010x}; pcapng is not read)")
    order, _ = PCAP_MAGICS[magic]
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    record = struct.Struct(order + "IIII")
    offset = 24
    while offset + record.size <= len(data):
        _, _, caplen, _ = record.unpack_from(data, offset)
        offset += record.size
        if offset + caplen > len(data):
            break  # the last record of a capture still being written: not complete yet
        yield linktype, data[offset:offset + caplen]
        offset += caplen


def ipv4_payload(linktype, frame):
    """The IPv4 packet inside a frame, or None (ARP, IPv6, another link type)."""
    if linktype == LINKTYPE_ETHERNET:
        offset, ethertype = 14, struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
        while ethertype in ETHERTYPE_VLAN and len(frame) >= offset + 4:
            ethertype = struct.unpack_from("!H", frame, offset + 2)[0]
            offset += 4
    elif linktype == LINKTYPE_LINUX_SLL:
        offset, ethertype = 16, struct.unpack_from("!H", frame, 14)[0] if len(frame) >= 16 else 0
    else:
        return None
    return frame[offset:] if ethertype == ETHERTYPE_IPV4 else None


def tcp_segment(packet):
    """(src ip, src port, dst ip, dst port, seq, flags, payload) of an IPv4 TCP packet, or None.
    Fragments other than the first carry no TCP header: they are skipped (the stack's hosts
    share one MTU, so TCP segments are not fragmented)."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != IPPROTO_TCP:
        return None
    header = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
        return None
    tcp = packet[header:total] if total >= header else packet[header:]
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    data_offset = (tcp[12] >> 4) * 4
    src = ".".join(str(b) for b in packet[12:16])
    dst = ".".join(str(b) for b in packet[16:20])
    return src, sport, dst, dport, seq, tcp[13], tcp[data_offset:]


# --- TCP reassembly ------------------------------------------------------------------------

class Direction:
    """One direction of one TCP connection: its segments, put in order by sequence number."""

    def __init__(self, src, sport, dst, dport, number):
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.number = number  # the n-th connection on this address pair (ports are reused)
        self.isn = None  # the sequence number of its first byte, when the capture saw the SYN
        self.segments = []  # (sequence number, payload)

    @property
    def name(self):
        suffix = f" #{self.number}" if self.number > 1 else ""
        return f"{self.src}:{self.sport}->{self.dst}:{self.dport}{suffix}"

    def chunks(self):
        """The bytes of this direction in sequence order, as contiguous chunks: a gap (a packet
        the capture missed) starts a new chunk, so that no needle is matched across one."""
        if not self.segments:
            return []
        base = self.isn if self.isn is not None else self.segments[0][0]
        ordered = []
        for seq, payload in self.segments:
            relative = (seq - base) % 2**32
            if relative >= 2**31:  # before the start: a retransmission of what came before the capture
                continue
            ordered.append((relative, payload))
        ordered.sort(key=lambda item: item[0])
        chunks, current, end = [], bytearray(), None
        for relative, payload in ordered:
            if end is not None and relative > end:
                chunks.append(bytes(current))
                current, end = bytearray(), None
            if end is None:
                current += payload
                end = relative + len(payload)
            elif relative + len(payload) > end:  # overlapping retransmissions add only what is new
                current += payload[end - relative:]
                end = relative + len(payload)
        chunks.append(bytes(current))
        return chunks


class Connection:
    """One TCP connection: its two directions, and which end is the client when the capture saw
    the SYN (its sender) or the SYN-ACK (its receiver)."""

    def __init__(self, number):
        self.number = number
        self.directions = {}  # (src, sport, dst, dport) -> Direction
        self.client = None  # (ip, port) of the client, when known from the handshake

    def direction(self, src, sport, dst, dport, order):
        key = (src, sport, dst, dport)
        if key not in self.directions:
            self.directions[key] = Direction(src, sport, dst, dport, self.number)
            order.append(self.directions[key])
        return self.directions[key]

    def has_data(self):
        return any(d.segments for d in self.directions.values())


def reassemble(packets):
    """The TCP connections of (linktype, frame) packets, and all their directions in the order
    they first appeared."""
    connections, directions, current, counts = [], [], {}, defaultdict(int)
    for linktype, frame in packets:
        packet = ipv4_payload(linktype, frame)
        segment = tcp_segment(packet) if packet is not None else None
        if segment is None:
            continue
        src, sport, dst, dport, seq, flags, payload = segment
        pair = tuple(sorted([(src, sport), (dst, dport)]))
        connection = current.get(pair)
        is_syn, is_syn_ack = flags & TCP_SYN and not flags & TCP_ACK, flags & TCP_SYN and flags & TCP_ACK
        isn = (seq + 1) % 2**32
        if is_syn and connection is not None:
            # A SYN with another ISN on a known address pair (a port used again) is a new connection;
            # the same ISN is the SYN sent once more.
            known = connection.directions.get((src, sport, dst, dport))
            if connection.client != (src, sport) or known is None or known.isn != isn:
                connection = None
        if connection is None:
            counts[pair] += 1
            connection = current[pair] = Connection(counts[pair])
            connections.append(connection)
        direction = connection.direction(src, sport, dst, dport, directions)
        if is_syn:
            connection.client, direction.isn = (src, sport), isn
        elif is_syn_ack:
            connection.client, direction.isn = (dst, dport), isn
        if payload:
            direction.segments.append((seq, payload))
    return connections, directions


# --- what the streams carry ----------------------------------------------------------------

# The stack's services, to tell the server's side of a connection whose start was not captured.
KNOWN_PORTS = {5671: "AMQP TLS", 5672: "AMQP", 15671: "management HTTPS", 15672: "management HTTP",
               15691: "Prometheus HTTPS", 15692: "Prometheus HTTP", 6379: "Redis", 5555: "Flower",
               25672: "Erlang distribution", 4369: "epmd", 35672: "rabbitmq CLI", 80: "HTTP", 443: "HTTPS"}
BASIC_AUTH = re.compile(rb"(?i)(?:proxy-)?authorization:[ \t]*basic[ \t]+([A-Za-z0-9+/=]+)")
PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def looks_like_tls(data):
    """A TLS handshake record starts the stream: content type 22, version 3.x."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


def percent_decoded(data):
    return PERCENT.sub(lambda match: bytes([int(match.group(1), 16)]), data) if b"%" in data else data


def basic_auth_values(data):
    """The decoded credentials (user:password) of every HTTP Basic authorization header."""
    values = []
    for match in BASIC_AUTH.finditer(data):
        encoded = match.group(1)
        try:
            values.append(base64.b64decode(encoded + b"=" * (-len(encoded) % 4)))
        except ValueError:
            continue
    return values


def find_needles(chunks, needles):
    """{(needle index, form): hits} in one direction's chunks."""
    hits = defaultdict(int)
    for chunk in chunks:
        decoded = percent_decoded(chunk)
        credentials = basic_auth_values(chunk)
        for index, needle in enumerate(needles, 1):
            raw = chunk.count(needle)
            if raw:
                hits[(index, "raw")] += raw
            # Only what percent-decoding revealed, not the raw hits once more.
            percent = decoded.count(needle) - raw if decoded is not chunk else 0
            if percent > 0:
                hits[(index, "percent")] += percent
            basic = sum(1 for value in credentials if needle in value)
            if basic:
                hits[(index, "basic-auth")] += basic
    return hits


def ends(connection):
    """(client ip, client port, server ip, server port): the client from the handshake, else
    the side that is not a known service port, else the side of the higher port."""
    first = next(iter(connection.directions.values()))
    a, b = (first.src, first.sport), (first.dst, first.dport)
    if connection.client is not None:
        client = connection.client
    elif (a[1] in KNOWN_PORTS) != (b[1] in KNOWN_PORTS):
        client = b if a[1] in KNOWN_PORTS else a
    else:
        client = a if a[1] > b[1] else b
    server = b if client == a else a
    return (*client, *server)


def scan(pcap, needles):
    """The scan's findings, as plain data (what --json writes)."""
    with open(pcap, "rb") as handle:
        # Mapped, not read: the payloads stay views into the file until a direction is searched.
        data = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)) if os.fstat(
            handle.fileno()).st_size else memoryview(b"")
    counter = [0]

    def counted(packets):
        for packet in packets:
            counter[0] += 1
            yield packet

    connections, directions = reassemble(counted(read_packets(data)))
    streams, hits, summary = [], [], {}
    for d in directions:
        chunks = d.chunks()
        size = sum(len(chunk) for chunk in chunks)
        summary[id(d)] = (size, looks_like_tls(chunks[0]) if chunks else False)
        streams.append({"stream": d.name, "bytes": size, "gaps": max(0, len(chunks) - 1),
                        "start_seen": d.isn is not None, "tls": summary[id(d)][1]})
        for (index, form), count in sorted(find_needles(chunks, needles).items()):
            hits.append({"needle": index, "length": len(needles[index - 1]), "form": form,
                         "stream": d.name, "count": count})
        d.segments = []  # searched: free the memory
    conns = []
    for connection in connections:
        cip, cport, sip, sport = ends(connection)
        to_server = connection.directions.get((cip, cport, sip, sport))
        to_client = connection.directions.get((sip, sport, cip, cport))
        sent, tls = summary[id(to_server)] if to_server else (0, False)
        conns.append({
            "client": f"{cip}:{cport}", "server": f"{sip}:{sport}", "server_port": sport,
            "bytes_to_server": sent, "bytes_to_client": summary[id(to_client)][0] if to_client else 0,
            "start_seen": connection.client is not None,
            # The client speaks first in TLS (its ClientHello): its first bytes tell, when the
            # capture saw the connection start and the client sent something.
            "tls": tls if connection.client is not None and sent else None,
        })
    return {"pcap": str(pcap), "packets": counter[0], "needles": len(needles), "streams": streams,
            "connections": conns, "hits": hits}


def port_summary(conns):
    """Per server port: connections, with data, TLS, plain, start not captured."""
    rows = {}
    for conn in conns:
        row = rows.setdefault(conn["server_port"], {"connections": 0, "with_data": 0, "tls": 0, "plain": 0,
                                                    "unknown": 0, "bytes": 0})
        row["connections"] += 1
        size = conn["bytes_to_server"] + conn["bytes_to_client"]
        row["bytes"] += size
        if size:
            row["with_data"] += 1
            if conn["tls"] is None:
                row["unknown"] += 1
            elif conn["tls"]:
                row["tls"] += 1
            else:
                row["plain"] += 1
    return dict(sorted(rows.items()))


def table(columns, rows):
    """A Markdown table: columns [(title, width)], rows of values."""
    lines = ["| " + " | ".join(title.ljust(width) for title, width in columns) + " |",
             "|" + "|".join("-" * (width + 2) for _, width in columns) + "|"]
    lines += ["| " + " | ".join(str(value).ljust(width) for value, (_, width) in zip(row, columns)) + " |"
              for row in rows]
    return "\n".join(lines)


def print_report(result):
    print(f"{result['pcap']}: {result['packets']} packets, {len(result['streams'])} TCP streams "
          f"(one per direction), {len(result['connections'])} connections, {result['needles']} needles\n")
    rows = [(f"#{hit['needle']}", hit["length"], hit["form"], hit["stream"], hit["count"]) for hit in result["hits"]]
    print(table((("needle", 6), ("length", 6), ("form", 10), ("stream", 47), ("hits", 4)),
                rows or [("-", "-", "-", "(no needle in any stream)", 0)]))
    found = sorted({hit["needle"] for hit in result["hits"]})
    print(f"needles found: {len(found)} of {result['needles']}" + "".join(f" #{index}" for index in found) + "\n")
    rows = [(port, KNOWN_PORTS.get(port, ""), row["connections"], row["with_data"], row["tls"], row["plain"],
             row["unknown"], row["bytes"]) for port, row in port_summary(result["connections"]).items()]
    print(table((("server port", 11), ("service", 19), ("connections", 11), ("with data", 9), ("TLS", 4),
                 ("plain", 5), ("unknown", 8), ("bytes", 10)), rows))
    started = [s for s in result["streams"] if s["start_seen"] and s["bytes"]]
    print(f"streams whose first bytes are a TLS record (0x16 0x03): {sum(s['tls'] for s in started)} of "
          f"{len(started)} with data and a captured start; gaps (missed packets): "
          f"{sum(s['gaps'] for s in result['streams'])}")
    print("(TLS, plain: connections whose client's first bytes are, or are not, a TLS record; unknown: the "
          "capture began after the connection did, or the client sent nothing)")


def read_needles(path):
    """One needle per line (the line break is not part of it); empty lines are skipped."""
    lines = pathlib.Path(path).read_bytes().split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines if line.strip(b"\r")]


# --- tcpdump -------------------------------------------------------------------------------

def docker_json(*argv):
    run = subprocess.run(["docker", *argv], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"docker {' '.join(argv)} failed: {run.stderr.strip()}")
    return json.loads(run.stdout)


def bridge_of(network):
    """The Linux bridge of a docker bridge network: its configured name, or br-<12 of its id>."""
    info = docker_json("network", "inspect", network)[0]
    if info.get("Driver") != "bridge":
        raise SystemExit(f"docker network {network} is a {info.get('Driver')} network, not a bridge")
    name = (info.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{info['Id'][:12]}"
    if not pathlib.Path("/sys/class/net", name).exists():
        raise SystemExit(f"the bridge {name} of docker network {network} is not on this machine")
    return name, info


def capture_filter(info, excluded, all_traffic):
    """A BPF filter: traffic between two addresses of the network's subnets (IPv4), minus the
    excluded containers (a name of the network's containers, or an address)."""
    addresses = {c["Name"]: c["IPv4Address"].split("/")[0] for c in (info.get("Containers") or {}).values()}
    parts = []
    if not all_traffic:
        subnets = [c["Subnet"] for c in (info.get("IPAM") or {}).get("Config") or [] if "." in c.get("Subnet", "")]
        if subnets:
            parts.append("(" + " or ".join(f"src net {subnet}" for subnet in subnets) + ")")
            parts.append("(" + " or ".join(f"dst net {subnet}" for subnet in subnets) + ")")
    for host in excluded:
        address = addresses.get(host, host)
        if not re.fullmatch(r"[0-9.]+", address):
            raise SystemExit(f"--exclude-host {host}: not a container of the network, nor an IPv4 address")
        parts.append(f"not host {address}")
    return " and ".join(parts)


def tcpdump_path():
    found = shutil.which("tcpdump", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise SystemExit("tcpdump is not installed (molecule/shared/bootstrap.sh installs it on Debian)")
    return found


def as_root(argv):
    """tcpdump needs root: as root directly, else through sudo without a password prompt."""
    if os.geteuid() == 0:
        return argv
    if not shutil.which("sudo"):
        raise SystemExit("tcpdump needs root: run this as root, or as a user with sudo")
    return ["sudo", "-n", *argv]


def files_of(pcap):
    pcap = pathlib.Path(pcap).resolve()
    return pcap, pcap.with_name(pcap.name + ".pid"), pcap.with_name(pcap.name + ".log")


def is_our_tcpdump(pid, pcap):
    """The pid still runs the tcpdump (or its sudo) writing this pcap (not a reused pid)."""
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"tcpdump") for arg in argv) and str(pcap).encode() in argv


def start(args):
    pcap, pid_file, log_file = files_of(args.pcap)
    if pid_file.exists() and is_our_tcpdump(int(pid_file.read_text()), pcap):
        raise SystemExit(f"a capture into {pcap} is running already (pid {pid_file.read_text().strip()})")
    bridge, info = bridge_of(args.network)
    bpf = capture_filter(info, args.exclude_host, args.all_traffic)
    # The capture may hold secrets (that is what it is for): the file is its owner's only, and
    # tcpdump drops root to this user (-Z) and writes into the file made here.
    pcap.parent.mkdir(parents=True, exist_ok=True)
    pcap.unlink(missing_ok=True)
    os.close(os.open(pcap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    # -B: a 32 MiB kernel buffer, so that bursts of thousands of tasks are not dropped.
    argv = as_root([tcpdump_path(), "-i", bridge, "-w", str(pcap), "-U", "-s", "0", "-n", "-B", "32768", "-Z", user])
    argv += [bpf] if bpf else []
    with open(log_file, "wb") as log:
        # Its own session: the capture outlives this command and the step that ran it.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 15
    while b"listening on" not in log_file.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            pid_file.unlink(missing_ok=True)
            raise SystemExit(f"tcpdump did not start on {bridge}: {log_file.read_text(errors='replace').strip()}")
        time.sleep(0.1)
    print(f"capturing docker network {args.network} on {bridge} into {pcap} (pid {process.pid}); "
          f"filter: {bpf or 'none'}")


def stop(args):
    pcap, pid_file, log_file = files_of(args.pcap)
    if not pid_file.exists():
        raise SystemExit(f"no capture into {pcap} was started ({pid_file} is missing)")
    pid = int(pid_file.read_text())
    if is_our_tcpdump(pid, pcap):
        # sudo relays the signal to tcpdump; as root, the signal goes to tcpdump itself.
        if os.geteuid() == 0:
            os.kill(pid, signal.SIGTERM)
        else:
            subprocess.run(as_root(["kill", "-TERM", str(pid)]), check=True)
        deadline = time.monotonic() + 10
        while is_our_tcpdump(pid, pcap) and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        print(f"the capture (pid {pid}) had ended already (its interface gone?)")
    pid_file.unlink()
    counts = [line for line in log_file.read_text(errors="replace").splitlines() if "packets" in line]
    print(f"stopped the capture into {pcap} ({pcap.stat().st_size} bytes): {'; '.join(counts) or 'no counts'}")


def scan_command(args):
    needles = read_needles(args.needle_file)
    if not needles:
        raise SystemExit(f"{args.needle_file} holds no needle")
    started = time.monotonic()
    result = scan(args.pcap, needles)
    result["seconds"] = round(time.monotonic() - started, 1)
    print_report(result)
    print(f"scanned in {result['seconds']} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["hits"] else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start tcpdump on a docker network's bridge")
    begin.add_argument("--network", required=True)
    begin.add_argument("--pcap", required=True)
    begin.add_argument("--exclude-host", action="append", default=[], metavar="CONTAINER_OR_IP")
    begin.add_argument("--all-traffic", action="store_true", help="also traffic to and from outside the network")
    end = commands.add_parser("stop", help="stop the capture")
    end.add_argument("--pcap", required=True)
    search = commands.add_parser("scan", help="search the capture for the needles")
    search.add_argument("--pcap", required=True)
    search.add_argument("--needle-file", required=True, help="one needle per line (written by the caller)")
    search.add_argument("--json", help="also write the findings to this file")
    args = parser.parse_args(argv)
    return {"start": start, "stop": stop, "scan": scan_command}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
