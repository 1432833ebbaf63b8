"""HTTP handlers: parse the request, call one service, render the response."""
