"""The seed example: an async counter. oobspec serves it over HTTP from inside the actor."""


class Counter:
    def __init__(self, start: int = 0):
        self.count = start

    async def increment(self, by: int = 1) -> int:
        self.count += by
        return self.count

    async def get(self) -> int:
        return self.count
