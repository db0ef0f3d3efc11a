"""A webhook receiver for Alertmanager, for the test stacks only: every POST's JSON body is
appended as one line to the file given (argv[2]), listening on 127.0.0.1:argv[1].
molecule/cluster/tests/test_alerts.py reads that file to see which alerts reached a person's
inbox, and when. molecule/shared/prepare.yml runs it on the monitoring hosts (the cluster
scenario's, the local stack's) as a transient systemd unit."""

import http.server
import json
import sys
import time


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(sys.argv[2], "a", encoding="utf-8") as out:
            out.write(json.dumps({"received": time.time(), "path": self.path, "body": body}) + "\n")
        self.send_response(200)
        self.end_headers()


http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
