import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Tickets } from './tickets.ts';

test('low is the lowest ticket not yet ended, whatever order tickets end in', () => {
  const tickets = new Tickets(1);
  const [a, b, c] = [tickets.begin(), tickets.begin(), tickets.begin()];
  assert.deepEqual([a, b, c], [1, 2, 3]);
  tickets.end(c);
  tickets.end(b);
  assert.equal(tickets.low, 1, 'ticket 1 is still in flight');
  assert.equal(tickets.inFlight, 1);
  tickets.end(a);
  assert.equal(tickets.low, 4, 'every ticket below 4 has ended');
  assert.equal(tickets.inFlight, 0);
});

test('drained() waits only for the tickets taken before it was called', async () => {
  const tickets = new Tickets();
  const early = tickets.begin();
  const drained = tickets.drained();
  const late = tickets.begin();
  let resolved = false;
  void drained.then(() => (resolved = true));
  await Promise.resolve();
  assert.equal(resolved, false, 'the early ticket is in flight');
  tickets.end(early);
  await drained;
  assert.equal(tickets.inFlight, 1, 'the late ticket, taken after drained(), was not waited for');
  tickets.end(late);
  await tickets.drained();
});

test('ending a ticket that is not in flight is a bug, caught', () => {
  const tickets = new Tickets();
  const ticket = tickets.begin();
  tickets.end(ticket);
  assert.throws(() => tickets.end(ticket), /in flight/);
  assert.throws(() => tickets.end(ticket + 1), /in flight/);
});

test('tickets behave as a set of numbers above a watermark, across ring growth (property)', () => {
  fc.assert(fc.property(fc.array(fc.nat(), { minLength: 200, maxLength: 600 }), (choices) => {
    const tickets = new Tickets(5);
    const model = new Set<number>();
    let next = 5;
    for (const choice of choices) {
      if (choice % 3 !== 0 || model.size === 0) {
        assert.equal(tickets.begin(), next);
        model.add(next++);
      } else {
        const open = [...model];
        const ticket = open[choice % open.length]!;
        model.delete(ticket);
        tickets.end(ticket);
      }
      const low = model.size === 0 ? next : Math.min(...model);
      assert.equal(tickets.low, low);
      assert.equal(tickets.inFlight, model.size);
      assert.equal(tickets.next, next);
    }
  }));
});
