"""Prints while it is imported: lint must keep its own stdout (e.g. -o json) clean."""
print("noisy_module imported")


class Noisy:
    async def get(self):
        return 1
