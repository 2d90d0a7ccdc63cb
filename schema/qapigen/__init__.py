"""qapigen: blockd's QAPI schema compiler.

Reads a schema written in QAPI's JSON-like syntax, checks it, and writes the C++
types, marshalling, command table, event emitters and introspection data that
blockd's QMP layer is built on.  Python 3 standard library only.
"""
