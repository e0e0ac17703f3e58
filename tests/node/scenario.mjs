// What the scripted clients (client.mjs, client-v2.mjs) share: a failure type for checks, a check,
// a timeout around a promise, and a sleep.

export class Failure extends Error {}

export function expect(cond, message, detail) {
  if (!cond) {
    throw new Failure(detail === undefined ? message : `${message}: ${JSON.stringify(detail)}`);
  }
}

export function withTimeout(promise, ms, label) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Failure(`timed out after ${ms} ms: ${label}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
