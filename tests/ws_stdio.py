"""ssh ProxyCommand: one TCP connection to a guest port through /vm/{h}/forward.
Usage: python3 ws_stdio.py WS_URL TOKEN UPSTREAM"""

import os
import sys
import threading

from websockets.sync.client import connect

url, token, upstream = sys.argv[1:4]
headers = {"Authorization": f"Bearer {token}", "X-Inlets-Upstream": upstream}
with connect(url, additional_headers=headers, max_size=None) as ws:

    def pump_in() -> None:
        while data := os.read(0, 65536):
            ws.send(data)
        ws.close()

    threading.Thread(target=pump_in, daemon=True).start()
    try:
        for msg in ws:
            os.write(1, msg if isinstance(msg, bytes) else msg.encode())
    except Exception:
        pass
