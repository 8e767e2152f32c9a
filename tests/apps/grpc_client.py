"""Calls the test gRPC server (grpc_server.py) at TARGET with grpcio and prints one JSON line per call:
{"call": …, "code": "OK" | gRPC status name, "details": …, "result": …, "trailers": {…}}.

    python grpc_client.py HOST:PORT
"""
import json
import sys

import grpc

target = sys.argv[1]
ch = grpc.insecure_channel(target)
M = "/strait.test.Echo/"


def report(call, fn):
    out = {"call": call}
    try:
        result, trailers = fn()
        out.update(code="OK", result=result, trailers=trailers)
    except grpc.RpcError as e:
        out.update(code=e.code().name, details=e.details(),
                   trailers=dict(e.trailing_metadata() or ()))
    print(json.dumps(out), flush=True)


def unary():
    resp, call = ch.unary_unary(M + "Unary").with_call(b"hello", timeout=10)
    return resp.decode(), dict(call.trailing_metadata())


def client_stream():
    resp, call = ch.stream_unary(M + "ClientStream").with_call(iter([b"a", b"b", b"c"]), timeout=10)
    return resp.decode(), dict(call.trailing_metadata())


def server_stream():
    call = ch.unary_stream(M + "ServerStream")(b"3", timeout=10)
    return [m.decode() for m in call], dict(call.trailing_metadata())


def bidi():
    call = ch.stream_stream(M + "Bidi")(iter([b"x", b"y"]), timeout=10)
    return [m.decode() for m in call], dict(call.trailing_metadata())


def slow():
    resp = ch.unary_unary(M + "Slow")(b"z", timeout=0.5)
    return resp.decode(), {}


def fail():
    resp = ch.unary_unary(M + "Fail")(b"z", timeout=10)
    return resp.decode(), {}


def cancel():
    call = ch.unary_stream(M + "Endless")(b"", timeout=30)
    got = [next(call).decode(), next(call).decode()]
    call.cancel()
    return got + [call.code().name], {}


def denied():
    resp = ch.unary_unary("/strait.test.Admin/Drop")(b"z", timeout=10)
    return resp.decode(), {}


for name, fn in [("unary", unary), ("client_stream", client_stream), ("server_stream", server_stream),
                 ("bidi", bidi), ("deadline", slow), ("fail", fail), ("cancel", cancel),
                 ("denied", denied)]:
    report(name, fn)
