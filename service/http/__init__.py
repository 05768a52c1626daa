"""The HTTP/JSON gateway (`serve --http-port`): every RPC as `POST /v1/<Method>`, made as a gRPC call to the server."""
