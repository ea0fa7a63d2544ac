import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { RequestSlots } from './request-slots.ts';

test('a value is found by its id once, then gone', () => {
  const slots = new RequestSlots<string>();
  const id = slots.add('a');
  assert.equal(slots.size, 1);
  assert.equal(slots.take(id + 1), undefined, 'an id never handed out finds nothing');
  assert.equal(slots.take(id), 'a');
  assert.equal(slots.take(id), undefined, 'taken already');
  assert.equal(slots.size, 0);
  assert.equal(slots.take(0), undefined);
  assert.equal(slots.take(-1), undefined);
  assert.equal(slots.take(2 ** 32), undefined);
});

test('an id whose slot is still taken by an old request is skipped, never shared', () => {
  const slots = new RequestSlots<number>();
  const stuck = slots.add(-1);
  // Many requests come and go while one stays pending: their ids wrap around the ring past it.
  for (let i = 0; i < 1000; i++) {
    const id = slots.add(i);
    assert.notEqual(id, stuck);
    assert.equal(slots.take(id), i);
  }
  assert.equal(slots.take(stuck), -1, 'the old request is still found by its own id');
});

test('takeWhere takes what it picks, oldest first, and leaves the rest findable', () => {
  const slots = new RequestSlots<number>();
  const ids = Array.from({ length: 100 }, (_, i) => slots.add(i));
  assert.deepEqual(slots.takeWhere((value) => value % 2 === 0), Array.from({ length: 50 }, (_, i) => i * 2));
  assert.equal(slots.size, 50);
  assert.equal(slots.take(ids[1]!), 1);
  assert.equal(slots.take(ids[2]!), undefined);
});

test('request slots behave as a map from the ids they hand out, across growth (property)', () => {
  fc.assert(fc.property(fc.array(fc.nat(), { minLength: 200, maxLength: 500 }), (choices) => {
    const slots = new RequestSlots<number>();
    const model = new Map<number, number>();
    for (const [step, choice] of choices.entries()) {
      if (choice % 3 !== 0 || model.size === 0) {
        const id = slots.add(step);
        assert.equal(model.has(id), false, 'a new id is not one in use');
        model.set(id, step);
      } else {
        const ids = [...model.keys()];
        const id = ids[choice % ids.length]!;
        assert.equal(slots.take(id), model.get(id));
        model.delete(id);
      }
      assert.equal(slots.size, model.size);
    }
    assert.deepEqual(slots.takeWhere(() => true), [...model.values()], 'everything left, oldest first');
  }));
});
