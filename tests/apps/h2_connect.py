"""An HTTP/2 CONNECT client made with the `h2` protocol library, presenting a client certificate: what an
attacker holding some certificate can ask a gateway for (tests/federation.rs).

    python h2_connect.py HOST:PORT SNI CERT KEY AUTHORITY

Prints the answer's status ("200", "403", ...), "reset" when the stream is reset, or "tls: REASON" when
the TLS handshake (or the first read after it, where TLS 1.3 reports a refused client certificate) fails.
The server is not verified: an attacker does not care who answers.
"""
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main():
    target, sni, cert, key, authority = sys.argv[1:6]
    host, port = target.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    try:
        tls = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5), server_hostname=sni)
    except (ssl.SSLError, OSError) as e:
        print(f"tls: {e}")
        return
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
    try:
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            if not data:
                print("closed")
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    print(dict(ev.headers)[":status"])
                    return
                if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    print("reset")
                    return
            tls.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError) as e:
        print(f"tls: {e}")


if __name__ == "__main__":
    main()
