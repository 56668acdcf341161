using System.Runtime.ExceptionServices;

namespace KernelLM.Runtime.Cpu;

/// <summary>A unit of data-parallel work: process items [begin, end) on worker <c>worker</c>.
/// Jobs are objects allocated once and re-armed with fields, so dispatching allocates nothing.</summary>
public abstract class ParallelJob
{
    public abstract void Execute(int begin, int end, int worker);
}

/// <summary>
/// A fixed set of worker threads that split a job's index range in chunks of <c>grain</c> items, the
/// caller's thread taking part. Unlike <c>Parallel.For</c> it allocates nothing per dispatch, which keeps
/// the decode loop allocation-free. Dispatches from different threads are serialised.
///
/// A dispatch ends when all its items are done, not when every worker has checked in: a worker that wakes
/// late (its core was busy) finds the dispatch's ticket stale and does nothing, so one descheduled thread
/// cannot stall the decode loop. The ticket packs the dispatch's generation (high 32 bits) with the next
/// item index (low 32 bits); a chunk is claimed by compare-and-swap on the whole ticket, so a stale worker
/// can never claim items of a later dispatch with an earlier job; a finished dispatch's ticket is retired
/// (its index set to int.MaxValue) before the next dispatch's fields are written.
/// </summary>
public sealed class CpuWorkerPool : IDisposable
{
    private static readonly Lazy<CpuWorkerPool> s_shared = new(() => new CpuWorkerPool(Environment.ProcessorCount));

    private readonly Thread[] _threads;
    private readonly object _gate = new();
    private readonly object _dispatch = new();
    private ParallelJob? _job;
    private int _count;
    private int _grain;
    private long _ticket;
    private int _completed;
    private int _generation;
    private volatile bool _disposed;
    private Exception? _error;

    public CpuWorkerPool(int threadCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threadCount, 1);
        _threads = new Thread[threadCount - 1];
        for (int i = 0; i < _threads.Length; i++)
        {
            int worker = i + 1;
            _threads[i] = new Thread(() => WorkerLoop(worker)) { IsBackground = true, Name = $"kernellm-cpu-{worker}" };
            _threads[i].Start();
        }
    }

    public static CpuWorkerPool Shared => s_shared.Value;

    /// <summary>Threads that execute a job, the caller included.</summary>
    public int ThreadCount => _threads.Length + 1;

    public void Run(ParallelJob job, int count, int grain)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (count <= 0)
        {
            return;
        }
        grain = Math.Max(1, grain);
        if (_threads.Length == 0 || count <= grain)
        {
            job.Execute(0, count, 0);
            return;
        }
        lock (_dispatch)
        {
            _job = job;
            _count = count;
            _grain = grain;
            _error = null;
            Volatile.Write(ref _completed, 0);
            int generation;
            lock (_gate)
            {
                generation = ++_generation;
                Volatile.Write(ref _ticket, (long)generation << 32);
                Monitor.PulseAll(_gate);
            }
            Drain(generation, 0);
            var spin = new SpinWait();
            while (Volatile.Read(ref _completed) < count)
            {
                spin.SpinOnce(sleep1Threshold: -1);
            }
            // Retire the ticket before the next dispatch rewrites _count, _grain and _job: a worker still
            // holding this generation's last ticket value then fails its compare-and-swap instead of
            // claiming "items" of a later, larger dispatch with this one's bookkeeping.
            Volatile.Write(ref _ticket, ((long)generation << 32) | int.MaxValue);
            Volatile.Write(ref _job, null);
            if (_error is { } error)
            {
                ExceptionDispatchInfo.Throw(error);
            }
        }
    }

    /// <summary>Claims and runs chunks of dispatch <paramref name="generation"/> until none is left.</summary>
    private void Drain(int generation, int worker)
    {
        while (true)
        {
            long ticket = Volatile.Read(ref _ticket);
            int begin = (int)(ticket & 0xffffffff);
            if ((int)(ticket >> 32) != generation || begin >= _count)
            {
                return;
            }
            int end = Math.Min(begin + _grain, _count);
            if (Interlocked.CompareExchange(ref _ticket, ((long)generation << 32) | (uint)end, ticket) != ticket)
            {
                continue;
            }
            // Claimed: the dispatch cannot finish (and _job cannot change) before these items complete.
            try
            {
                Volatile.Read(ref _job)!.Execute(begin, end, worker);
            }
            catch (Exception error)
            {
                Interlocked.CompareExchange(ref _error, error, null);
            }
            Interlocked.Add(ref _completed, end - begin);
        }
    }

    private void WorkerLoop(int worker)
    {
        int seen = 0;
        while (true)
        {
            // Spin briefly before sleeping: consecutive layers dispatch within microseconds of each other.
            for (int i = 0; i < 200 && Volatile.Read(ref _generation) == seen && !_disposed; i++)
            {
                Thread.SpinWait(30);
            }
            lock (_gate)
            {
                while (_generation == seen && !_disposed)
                {
                    Monitor.Wait(_gate);
                }
                if (_disposed)
                {
                    return;
                }
                seen = _generation;
            }
            Drain(seen, worker);
        }
    }

    public void Dispose()
    {
        if (_disposed || ReferenceEquals(this, s_shared.IsValueCreated ? s_shared.Value : null))
        {
            return;
        }
        lock (_gate)
        {
            _disposed = true;
            Monitor.PulseAll(_gate);
        }
        foreach (var thread in _threads)
        {
            thread.Join();
        }
    }
}
