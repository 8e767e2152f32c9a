"""A gRPC server (grpcio, the reference implementation's core) with the four kinds of call, on generic
handlers so no code generation is needed (messages are raw bytes):

    /strait.test.Echo/Unary          unary: answers b"echo:" + request, sets trailing metadata x-served-by
    /strait.test.Echo/ClientStream   client streaming: answers the requests joined with b","
    /strait.test.Echo/ServerStream   server streaming: the request is a count N, answers N messages
    /strait.test.Echo/Bidi           bidirectional: echoes each message as it comes
    /strait.test.Echo/Slow           unary that sleeps 2 s (for deadlines)
    /strait.test.Echo/Fail           unary that fails with NOT_FOUND and a message
    /strait.test.Echo/Endless        server streaming until the client cancels; then prints
                                     "endless cancelled" (the client's RST_STREAM reached the server)

    python grpc_server.py PORT [PORT…]
"""
import sys
import time
from concurrent import futures

import grpc


def unary(req, ctx):
    ctx.set_trailing_metadata((("x-served-by", "grpc-server"),))
    return b"echo:" + req


def client_stream(reqs, ctx):
    return b",".join(reqs)


def server_stream(req, ctx):
    for i in range(int(req)):
        yield b"msg-%d" % i


def bidi(reqs, ctx):
    for r in reqs:
        yield b"bidi:" + r


def slow(req, ctx):
    time.sleep(2)
    return req


def endless(req, ctx):
    ctx.add_callback(lambda: print("endless cancelled", flush=True))
    i = 0
    while ctx.is_active():
        yield b"tick-%d" % i
        i += 1
        time.sleep(0.05)


def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Endless": grpc.unary_stream_rpc_method_handler(endless),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("strait.test.Echo", handlers),))
for port in sys.argv[1:]:
    server.add_insecure_port(f"[::]:{port}")
server.start()
print("serving", sys.argv[1:], flush=True)
server.wait_for_termination()
