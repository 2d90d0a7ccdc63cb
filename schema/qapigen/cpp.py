"""C++ spelling of schema types, shared by the output modules.

Also decides where a recursive type needs a Box<T> (a deep-copying heap pointer)
and in which order the C++ definitions must appear.
"""

from __future__ import annotations

from .model import (AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, Schema, Type,
                    c_member)


class Layout:
    """Boxing decisions and definition order for the object and alternate types of a schema."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.types = [t for t in schema.user_types() if isinstance(t, (ObjectType, AlternateType))]
        # (owner name, member/branch name) pairs held in a Box.
        self.boxed: set[tuple[str, str]] = set()
        self._decide_boxing()
        self.order = self._order()

    @staticmethod
    def _edges(t: Type) -> list[tuple[str, Type]]:
        """Members whose type must be complete where `t` is defined (lists need not be)."""
        out: list[tuple[str, Type]] = []
        if isinstance(t, ObjectType):
            out += [(m.name, m.type) for m in t.members]
            out += [("u." + v.case, v.type) for v in t.variants]
        elif isinstance(t, AlternateType):
            out += [(b.name, b.type) for b in t.branches]
        return [(n, d) for n, d in out if isinstance(d, (ObjectType, AlternateType))]

    def _sccs(self) -> dict[str, int]:
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        comp: dict[str, int] = {}
        counter = [0, 0]
        by_name = {t.name: t for t in self.types}

        def strong(name: str):
            for member, dep in self._edges(by_name[name]):
                if (name, member) not in self.boxed:
                    yield dep.name

        def visit(v: str) -> None:
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            for w in strong(v):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp[w] = counter[1]
                    if w == v:
                        break
                counter[1] += 1

        for t in self.types:
            if t.name not in index:
                visit(t.name)
        return comp

    def _cyclic_edges(self, alternates_only: bool) -> list[tuple[str, str]]:
        comp = self._sccs()
        sizes: dict[int, int] = {}
        for c in comp.values():
            sizes[c] = sizes.get(c, 0) + 1
        out = []
        for t in self.types:
            if alternates_only and not isinstance(t, AlternateType):
                continue
            for member, dep in self._edges(t):
                if (t.name, member) in self.boxed:
                    continue
                if comp[t.name] == comp[dep.name] and (sizes[comp[t.name]] > 1 or dep is t):
                    out.append((t.name, member))
        return out

    def _decide_boxing(self) -> None:
        # Prefer boxing alternate branches (BlockdevRef holds BlockdevOptions), then members.
        self.boxed.update(self._cyclic_edges(alternates_only=True))
        while True:
            edges = self._cyclic_edges(alternates_only=False)
            if not edges:
                return
            self.boxed.add(edges[0])

    def _order(self) -> list[Type]:
        by_name = {t.name: t for t in self.types}
        done: set[str] = set()
        order: list[Type] = []

        def visit(t: Type) -> None:
            if t.name in done:
                return
            done.add(t.name)
            for member, dep in self._edges(t):
                if (t.name, member) not in self.boxed:
                    visit(by_name[dep.name])
            order.append(t)

        for t in self.types:
            visit(t)
        return order

    def is_boxed(self, owner: Type, member: str) -> bool:
        return (owner.name, member) in self.boxed


def cpp_type(t: Type) -> str:
    """The C++ type holding a value of schema type `t` (without optional/Box)."""
    if isinstance(t, BuiltinType):
        return t.cpp
    if isinstance(t, ArrayType):
        return f"std::vector<{cpp_type(t.element)}>"
    return t.name


def cpp_name(t: Type) -> str:
    return cpp_type(t)


def member_decl_type(layout: Layout, owner: Type, member: str, t: Type, optional: bool) -> str:
    inner = cpp_type(t)
    if layout.is_boxed(owner, member):
        inner = f"Box<{inner}>"
    return f"std::optional<{inner}>" if optional else inner


def needs_init(t: Type) -> bool:
    """Scalars get a value-initializer so a default-constructed struct is fully defined."""
    return isinstance(t, EnumType) or (isinstance(t, BuiltinType) and t.kind not in ("str", "any"))


def c_ident(name: str) -> str:
    return c_member(name)


def cpp_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
