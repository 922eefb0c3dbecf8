-- How many distinct ads the catalog holds; the demo ads are seeded only when this is 0.
SELECT uniqExact(id) FROM ads
