"""Realistic synthetic event generators for the finance and ecommerce schemas (raw columns, as a pyarrow Table).

Each user has habits (activity rate, favourite merchants or categories, hours of the day, spend level,
buyer-or-browser) so sequence models have signal to learn; output is deterministic for a seed and vectorized.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from domaintok.artifacts import atomic_file
from domaintok.errors import DomaintokError

_TS = pa.timestamp("us", tz="UTC")

# Declared once per domain: the raw columns of domaintok/schemas/<domain>.yaml, in order.
FINANCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("timestamp", _TS),
        ("amount", pa.float64()),  # signed: negative = debit
        ("description", pa.string()),
        ("merchant_id", pa.string()),
        ("mcc", pa.string()),
        ("channel", pa.string()),
    ]
)
ECOMMERCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("timestamp", _TS),
        ("event_type", pa.string()),
        ("price", pa.float64()),
        ("quantity", pa.int64()),
        ("category_l1", pa.string()),
        ("category_l2", pa.string()),
        ("product_id", pa.string()),
        ("product_title", pa.string()),
    ]
)

# (mcc, category word, median debit amount, share of merchants, online share of the category's merchants)
_MCC = [
    ("5411", "GROCERY", 45.0, 0.14, 0.10),
    ("5812", "RESTAURANT", 32.0, 0.12, 0.05),
    ("5814", "FAST FOOD", 11.0, 0.10, 0.10),
    ("5541", "FUEL", 48.0, 0.06, 0.00),
    ("5912", "PHARMACY", 22.0, 0.05, 0.15),
    ("5311", "DEPT STORE", 70.0, 0.04, 0.30),
    ("5651", "CLOTHING", 60.0, 0.06, 0.40),
    ("5732", "ELECTRONICS", 180.0, 0.03, 0.50),
    ("5942", "BOOKS", 19.0, 0.03, 0.60),
    ("4121", "TAXI RIDE", 18.0, 0.04, 0.90),
    ("4111", "TRANSIT", 3.5, 0.03, 0.20),
    ("4511", "AIRLINE", 320.0, 0.02, 0.95),
    ("7011", "HOTEL", 210.0, 0.02, 0.85),
    ("4814", "TELECOM", 55.0, 0.02, 0.90),
    ("4900", "UTILITIES", 95.0, 0.02, 0.90),
    ("5815", "DIGITAL MEDIA", 12.0, 0.03, 1.00),
    ("7832", "CINEMA", 24.0, 0.02, 0.40),
    ("5999", "MISC RETAIL", 35.0, 0.05, 0.40),
    ("5300", "WHOLESALE CLUB", 120.0, 0.02, 0.10),
    ("5995", "PET SUPPLIES", 38.0, 0.02, 0.40),
    ("7230", "BARBER BEAUTY", 40.0, 0.02, 0.05),
    ("8011", "DOCTOR", 90.0, 0.02, 0.05),
    ("5499", "CONVENIENCE", 9.0, 0.06, 0.00),
    ("6011", "ATM CASH", 100.0, 0.00, 0.00),  # ATM withdrawals: merchants added separately below
]
_BRAND_A = ["NORTH", "BLUE", "GOLDEN", "CITY", "METRO", "SUNNY", "GREEN", "ROYAL", "PRIME", "EAGLE", "OAK",
            "RIVER", "STAR", "UNION", "LUCKY", "ATLAS", "NOVA", "SILVER", "FRESH", "URBAN"]
_BRAND_B = ["MART", "HOUSE", "CO", "DEPOT", "MARKET", "HUB", "PLACE", "CORNER", "WORKS", "POINT", "LANE", "STOP"]
_CITIES = ["NEW YORK", "CHICAGO", "AUSTIN", "SEATTLE", "BOSTON", "DENVER", "MIAMI", "PORTLAND", "ATLANTA", "DALLAS"]
_CREDIT_KINDS = [  # (description template, share of credits, median amount)
    ("PAYROLL DEPOSIT {}", 0.55, 2400.0),
    ("REFUND {}", 0.25, 45.0),
    ("TRANSFER FROM {}", 0.20, 300.0),
]
_EMPLOYERS = ["ACME CORP", "GLOBEX INC", "INITECH", "UMBRELLA LLC", "STARK IND", "WAYNE ENT", "HOOLI", "VANDELAY"]
_FRIENDS = ["J SMITH", "A GARCIA", "M CHEN", "L JOHNSON", "R PATEL", "K NGUYEN", "S MULLER", "T ROSSI"]

# category_l1 -> (category_l2 list, median price)
_CATEGORIES = {
    "electronics": (["phones", "laptops", "audio", "cameras", "accessories"], 160.0),
    "home": (["kitchen", "furniture", "bedding", "decor", "lighting"], 55.0),
    "fashion": (["shoes", "dresses", "shirts", "jackets", "bags"], 45.0),
    "beauty": (["skincare", "makeup", "fragrance", "haircare"], 22.0),
    "sports": (["fitness", "cycling", "running", "camping", "team_sports"], 48.0),
    "books": (["fiction", "nonfiction", "children", "comics"], 14.0),
    "toys": (["puzzles", "dolls", "building", "outdoor_toys"], 25.0),
    "grocery": (["snacks", "beverages", "pantry", "coffee_tea", "organic"], 8.0),
    "garden": (["tools", "plants", "grills", "patio"], 60.0),
    "pets": (["dog", "cat", "aquarium", "small_pets"], 20.0),
    "automotive": (["parts", "car_care", "car_electronics"], 40.0),
    "office": (["stationery", "printers", "desks"], 30.0),
}
_ADJ = ["classic", "premium", "eco", "smart", "compact", "deluxe", "ultra", "soft", "pro", "mini", "vintage", "sport"]
_BRANDS = ["acme", "zenith", "orbit", "lumen", "nimbus", "vertex", "aurora", "pioneer", "harbor", "summit"]
# Funnel of event types and the base probability of each; a user's buyer propensity shifts mass to purchase.
_EVENT_TYPES = ["view", "cart", "remove_from_cart", "purchase", "wishlist"]
_EVENT_BASE_P = np.array([0.70, 0.14, 0.04, 0.08, 0.04])

DEFAULT_START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _pick(rng: np.random.Generator, words: list[str], n: int) -> np.ndarray:
    return np.asarray(words, dtype=object)[rng.integers(0, len(words), n)]


def _user_ids(n_users: int) -> np.ndarray:
    width = max(6, len(str(n_users - 1)))
    return np.array([f"u{i:0{width}d}" for i in range(n_users)], dtype=object)


def _events_per_user(rng: np.random.Generator, n_users: int, n_events: int) -> np.ndarray:
    """Event owner of each event (sorted by user): heavy-tailed activity rates, every user at least one event."""
    if n_events < n_users:
        raise DomaintokError(f"--events ({n_events}) must be at least --users ({n_users}): every user has an event")
    rate = rng.lognormal(0.0, 1.0, n_users)
    counts = 1 + rng.multinomial(n_events - n_users, rate / rate.sum())
    return np.repeat(np.arange(n_users), counts)


def _timestamps(rng: np.random.Generator, owner: np.ndarray, n_users: int, start: dt.datetime, days: int) -> np.ndarray:
    """Event times (us since epoch, UTC): each user keeps to a preferred hour of day and a weekday/weekend mix."""
    n = len(owner)
    pref_hour = rng.normal(14.0, 3.5, n_users).clip(6, 23)  # centre of the user's day
    spread = rng.uniform(1.0, 3.5, n_users)
    weekend_lover = rng.uniform(0.0, 1.0, n_users)
    day = rng.integers(0, days, n)
    # A weekend-loving user re-draws weekday events onto the nearest Saturday with that probability.
    start_dow = start.weekday()
    dow = (start_dow + day) % 7
    move = (dow < 5) & (rng.uniform(0, 1, n) < 0.5 * weekend_lover[owner])
    day = np.where(move, np.minimum(day + (5 - dow), days - 1), day)
    hour = rng.normal(pref_hour[owner], spread[owner]) % 24
    seconds = day * 86400 + (hour * 3600).astype(np.int64) + rng.integers(0, 60, n)
    start_us = int(start.timestamp() * 1_000_000)
    return start_us + seconds.astype(np.int64) * 1_000_000 + rng.integers(0, 1_000_000, n)


def _popularity(rng: np.random.Generator, n: int, exponent: float = 0.9) -> np.ndarray:
    """Zipf-like popularity weights in random order: a few big names, a long tail, no single giant."""
    return 1.0 / (rng.permutation(n) + 5.0) ** exponent


def _within_groups(rng: np.random.Generator, group: np.ndarray, item_group: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per event, an item of the event's group drawn by weight; one vectorized search over all groups.

    Items are laid out group by group on one line where group g occupies [g, g + 1) split by weight, so
    searching g + u finds the item for a uniform u.
    """
    order = np.lexsort((np.arange(len(item_group)), item_group))
    g_sorted = item_group[order]
    w = weight[order]
    totals = np.bincount(g_sorted, weights=w, minlength=int(item_group.max()) + 1)
    cum_in_group = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)])[g_sorted]
    line = g_sorted + cum_in_group / totals[g_sorted]
    pos = np.searchsorted(line, group + rng.uniform(0, 1, len(group)) * (1 - 1e-12), side="right")
    return order[pos.clip(0, len(order) - 1)]


def _favourites(rng: np.random.Generator, n_users: int, k: int, popularity: np.ndarray) -> np.ndarray:
    """(n_users, k) favourite items per user, drawn by global popularity (a user's own small world)."""
    cum = np.cumsum(popularity / popularity.sum())
    return np.searchsorted(cum, rng.uniform(0, 1, (n_users, k)), side="right").clip(0, len(popularity) - 1)


def _choose(rng, owner, favourites, popularity, p_favourite):
    """Per event: one of the owner's favourites (earlier ones likelier) or, else, any item by popularity."""
    n = len(owner)
    k = favourites.shape[1]
    rank = np.minimum((rng.pareto(1.2, n)).astype(np.int64), k - 1)
    fav = favourites[owner, rank]
    cum = np.cumsum(popularity / popularity.sum())
    anyone = np.searchsorted(cum, rng.uniform(0, 1, n), side="right").clip(0, len(popularity) - 1)
    return np.where(rng.uniform(0, 1, n) < p_favourite, fav, anyone)


def _finish(columns: dict[str, object], schema: pa.Schema, ts_us: np.ndarray, owner: np.ndarray) -> pa.Table:
    # Time order across users (as a stream would deliver them), ties by user then generation order.
    order = np.lexsort((np.arange(len(ts_us)), owner, ts_us))
    arrays = []
    for field in schema:
        values = columns[field.name]
        if isinstance(values, pa.Array):
            arrays.append(values.take(pa.array(order)))
        else:
            arrays.append(pa.array(np.asarray(values)[order], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def generate_finance(n_users: int, n_events: int, *, seed: int = 0, start: dt.datetime = DEFAULT_START,
                     days: int = 180) -> pa.Table:
    """Card/account transactions: debits at favourite merchants (log-normal amounts by MCC and the user's
    spend level) and ~10% credits (payroll, refunds, transfers)."""
    rng = np.random.default_rng(seed)
    owner = _events_per_user(rng, n_users, n_events)
    n = len(owner)
    ts = _timestamps(rng, owner, n_users, start, days)

    # Merchant catalogue: ~ one merchant per 20 users, at least 200.
    n_merchants = max(200, n_users // 20)
    mcc_share = np.array([m[3] for m in _MCC])
    m_cat = rng.choice(len(_MCC), n_merchants, p=mcc_share / mcc_share.sum())
    m_online = rng.uniform(0, 1, n_merchants) < np.array([m[4] for m in _MCC])[m_cat]
    m_names = np.array(
        [f"{a} {b} {_MCC[c][1]}" for a, b, c in zip(_pick(rng, _BRAND_A, n_merchants), _pick(rng, _BRAND_B, n_merchants), m_cat)],
        dtype=object,
    )
    m_city = _pick(rng, _CITIES, n_merchants)
    m_store = rng.integers(1, 999, n_merchants)
    m_desc = np.where(
        m_online,
        np.char.add(m_names.astype(str), " ONLINE"),
        np.char.add(np.char.add(np.char.add(m_names.astype(str), " #"), m_store.astype(str)),
                    np.char.add(" ", m_city.astype(str))),
    ).astype(object)
    m_ids = np.array([f"m{i:06d}" for i in range(n_merchants)], dtype=object)
    m_price = np.array([m[2] for m in _MCC])[m_cat] * rng.lognormal(0.0, 0.25, n_merchants)
    popularity = _popularity(rng, n_merchants)

    favourites = _favourites(rng, n_users, 8, popularity)
    loyalty = rng.beta(5, 2, n_users)  # share of a user's spending at favourite merchants
    spend_level = rng.lognormal(0.0, 0.35, n_users)
    contactless = rng.uniform(0, 1, n_users)
    atm_user = rng.uniform(0, 0.08, n_users)  # some users withdraw cash often, most rarely

    merchant = _choose(rng, owner, favourites, popularity, loyalty[owner])
    amount = -(m_price[merchant] * spend_level[owner] * rng.lognormal(0.0, 0.5, n)).round(2)
    description = m_desc[merchant]
    merchant_id = m_ids[merchant]
    mcc = np.array([m[0] for m in _MCC], dtype=object)[m_cat[merchant]]
    channel = np.where(
        m_online[merchant], "online", np.where(rng.uniform(0, 1, n) < contactless[owner], "contactless", "card_present")
    ).astype(object)

    atm = rng.uniform(0, 1, n) < atm_user[owner]
    amount = np.where(atm, -np.round(rng.choice([20, 40, 60, 100, 200], n) * spend_level[owner].clip(0.5, 2)) , amount)
    description = np.where(atm, np.char.add("ATM WITHDRAWAL ", m_city[merchant].astype(str)).astype(object), description)
    mcc = np.where(atm, "6011", mcc)
    channel = np.where(atm, "atm", channel)
    merchant_id = np.where(atm, "atm", merchant_id)

    # ~10% credits: payroll (the user's one employer), refunds (of a merchant they use), transfers (a friend).
    credit = rng.uniform(0, 1, n) < 0.10
    kind = rng.choice(len(_CREDIT_KINDS), n, p=[c[1] for c in _CREDIT_KINDS])
    employer = _pick(rng, _EMPLOYERS, n_users)[owner]
    friend = _pick(rng, _FRIENDS, n)
    counterparty = np.where(kind == 0, employer, np.where(kind == 1, m_names[merchant], friend))
    templates = np.array([c[0] for c in _CREDIT_KINDS], dtype=object)[kind]
    credit_desc = np.array([t.format(c) for t, c in zip(templates[credit], counterparty[credit])], dtype=object)
    credit_amount = (np.array([c[2] for c in _CREDIT_KINDS])[kind] * spend_level[owner] * rng.lognormal(0, 0.3, n))
    description[credit] = credit_desc
    amount = np.where(credit, credit_amount.round(2), amount)
    channel = np.where(credit, "transfer", channel)
    mcc = np.where(credit & (kind == 1), mcc, np.where(credit, "6012", mcc))
    merchant_id = np.where(credit & (kind != 1), "bank", merchant_id)

    users = _user_ids(n_users)
    columns = {
        "user_id": users[owner],
        "timestamp": pa.array(ts, pa.int64()).cast(_TS),
        "amount": amount.astype(np.float64),
        "description": description,
        "merchant_id": merchant_id,
        "mcc": mcc,
        "channel": channel,
    }
    return _finish(columns, FINANCE_SCHEMA, ts, owner)


def generate_ecommerce(n_users: int, n_events: int, *, seed: int = 0, start: dt.datetime = DEFAULT_START,
                       days: int = 180) -> pa.Table:
    """Shop events (view, cart, remove_from_cart, purchase, wishlist) on products of favourite categories;
    buyers convert more, price-sensitive users pick cheaper products."""
    rng = np.random.default_rng(seed)
    owner = _events_per_user(rng, n_users, n_events)
    n = len(owner)
    ts = _timestamps(rng, owner, n_users, start, days)

    l1_names = list(_CATEGORIES)
    l2_pairs = [(i, l2) for i, l1 in enumerate(l1_names) for l2 in _CATEGORIES[l1][0]]
    n_products = max(500, n_users // 5)
    p_l2 = rng.integers(0, len(l2_pairs), n_products)
    p_l1 = np.array([l2_pairs[j][0] for j in range(len(l2_pairs))])[p_l2]
    p_price = (np.array([_CATEGORIES[l1][1] for l1 in l1_names])[p_l1] * rng.lognormal(0, 0.6, n_products)).round(2)
    p_ids = np.array([f"p{i:06d}" for i in range(n_products)], dtype=object)
    l2_word = np.array([l2 for _, l2 in l2_pairs], dtype=object)
    p_title = np.array(
        [f"{b} {a} {w.replace('_', ' ')}" for b, a, w in
         zip(_pick(rng, _BRANDS, n_products), _pick(rng, _ADJ, n_products), l2_word[p_l2])],
        dtype=object,
    )
    popularity = _popularity(rng, n_products, 0.8)

    # A user's taste: a few favourite categories (sparse Dirichlet); favourite and other products inside them.
    taste = rng.dirichlet(np.full(len(l1_names), 0.3), n_users)  # (U, L1)
    taste_cum = taste.cumsum(1)
    fav_l1 = (taste_cum[:, None, :] < rng.uniform(0, 1, (n_users, 12, 1))).sum(2).clip(0, len(l1_names) - 1)
    favourites = _within_groups(rng, fav_l1.ravel(), p_l1, popularity).reshape(n_users, 12)
    loyalty = rng.beta(4, 3, n_users)
    event_l1 = (taste_cum[owner] < rng.uniform(0, 1, (n, 1))).sum(1).clip(0, len(l1_names) - 1)
    explore = _within_groups(rng, event_l1, p_l1, popularity)  # any product of a category the user likes
    rank = np.minimum(rng.pareto(1.2, n).astype(np.int64), favourites.shape[1] - 1)
    product = np.where(rng.uniform(0, 1, n) < loyalty[owner], favourites[owner, rank], explore)
    # Price-sensitive users swap an expensive pick for a cheaper product of the same category half the time.
    sensitive = rng.uniform(0, 1, n_users) < 0.3
    cheaper = _within_groups(rng, p_l1[product], p_l1, popularity / p_price)
    swap = sensitive[owner] & (p_price[cheaper] < p_price[product]) & (rng.uniform(0, 1, n) < 0.5)
    product = np.where(swap, cheaper, product)

    buyer = rng.beta(2, 6, n_users)  # propensity to buy rather than browse
    p = np.tile(_EVENT_BASE_P, (n_users, 1))
    p[:, 3] *= 0.3 + 4 * buyer
    p[:, 0] *= 1.3 - buyer
    p /= p.sum(1, keepdims=True)
    event = (p.cumsum(1)[owner] < rng.uniform(0, 1, (n, 1))).sum(1).clip(0, len(_EVENT_TYPES) - 1)
    quantity = np.where(np.isin(event, [1, 3]), 1 + rng.geometric(0.7, n) - 1, 1).astype(np.int64)
    price = (p_price[product] * rng.choice([1.0, 1.0, 1.0, 0.9, 0.8], n)).round(2)

    users = _user_ids(n_users)
    columns = {
        "user_id": users[owner],
        "timestamp": pa.array(ts, pa.int64()).cast(_TS),
        "event_type": np.array(_EVENT_TYPES, dtype=object)[event],
        "price": price,
        "quantity": quantity,
        "category_l1": np.array(l1_names, dtype=object)[p_l1[product]],
        "category_l2": l2_word[p_l2[product]],
        "product_id": p_ids[product],
        "product_title": p_title[product],
    }
    return _finish(columns, ECOMMERCE_SCHEMA, ts, owner)


GENERATORS: dict[str, Callable[..., pa.Table]] = {"finance": generate_finance, "ecommerce": generate_ecommerce}
DOMAINS = tuple(GENERATORS)


def generate_events(domain: str, n_users: int, n_events: int, *, seed: int = 0, start: dt.datetime = DEFAULT_START,
                    days: int = 180) -> pa.Table:
    """`n_events` raw events of `n_users` users for `domain` ("finance" | "ecommerce"), in time order."""
    if domain not in GENERATORS:
        raise DomaintokError(f"unknown synthetic domain {domain!r} (expected one of {', '.join(DOMAINS)})")
    if n_users < 1:
        raise DomaintokError(f"number of users must be >= 1, got {n_users}")
    if days < 1:
        raise DomaintokError(f"days must be >= 1, got {days}")
    return GENERATORS[domain](n_users, n_events, seed=seed, start=start, days=days)


def write_events_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write `table` to `path` atomically (temp file + rename), so a rerun never leaves half a file."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
