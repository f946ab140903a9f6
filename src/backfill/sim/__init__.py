"""The engine simulator: a cheap model of a continuous-batching LLM engine, served over the OpenAI HTTP API.

``profile`` holds its parameters, ``engine`` the pure, steppable model (no I/O, no clock), ``server`` the HTTP
server that runs the model in real time by sleeping each iteration's modelled duration. See docs/simulator.md.
"""
