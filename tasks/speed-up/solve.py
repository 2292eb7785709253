"""The n-th prime for each n asked: the file the agent edits, to make it faster.

Input (stdin, JSON): a list of n values, e.g. [3000, 6000]. Output: the last line printed is a
JSON list of the answers, e.g. [27449, 59359] (the 1st prime is 2).

It is correct, and deliberately slow: a plain sieve of Eratosthenes in Python lists, sized
generously and built afresh for every question.
"""

import json
import math
import sys

SIEVE_MARGIN = 3.0  # how far past the estimate of the n-th prime to sieve (1.0 is always enough)


def upper_bound(n: int) -> int:
    """A number above the n-th prime: n (ln n + ln ln n) is one for n >= 6, times the margin."""
    if n < 6:
        return 15
    return int(n * (math.log(n) + math.log(math.log(n))) * SIEVE_MARGIN) + 1


def primes_below(limit: int) -> list[int]:
    """Every prime below `limit`, by crossing out the multiples of each prime."""
    is_prime = [True] * limit
    is_prime[0] = is_prime[1] = False
    for i in range(2, limit):
        if is_prime[i]:
            for multiple in range(i * i, limit, i):
                is_prime[multiple] = False
    return [i for i in range(limit) if is_prime[i]]


def nth_prime(n: int) -> int:
    limit = upper_bound(n)
    while True:
        primes = primes_below(limit)
        if len(primes) >= n:
            return primes[n - 1]
        limit *= 2  # the sieve was too short (a margin below 1): try again, twice as far


def main() -> None:
    queries = json.load(sys.stdin)
    print(json.dumps([nth_prime(n) for n in queries]))


if __name__ == "__main__":
    main()
